"""Learned vectors (`vllm-emosteer extract --recipe learned`): one offset per layer on a band, trained per concept.

The data are the contrast recipe's (the bundled neutral questions, the model's emotional answers under the
instruction, its plain answers, filtered by the two scorers) or a pairs file's (`pairs.py`): per concept, pairs of
(plain question, positive answer, negative answer). Training runs in transformers (torch) on any device, the model
frozen; only the offsets learn. Two objectives:

* `lm` (the default; prompt distillation): the mean token NLL of the positive answers teacher-forced after the
  *plain* question, i.e. the vector recreates what the model writes when it is asked for the emotion.
* `bipo` (BiPO, arXiv 2406.00045; RePS-like, arXiv 2505.20809): raise log p(positive) against log p(negative), each
  relative to the unsteered model, DPO-style: `-logsigmoid(beta * ((lp_pos(v) - lp_pos(0)) - (lp_neg(v) -
  lp_neg(0))))` with sequence log-probabilities: what tells the emotional answer from the plain answer to the
  same question, not what the two share.

Why `lm` is the default: on the default model's contrast data (40 questions, 2026-12-02), `bipo` widened the margin
by lowering both answers (the likelihood displacement known from DPO): on held-out questions log p(positive) fell
for all five emotions (-0.12 to -0.93 nats per token), log p(negative) more (-1.18 to -1.75). `lm` raised
log p(positive) (+0.12 to +0.88) and lowered log p(negative) (-0.01 to -0.27) for all five: the two-way effect
steering wants, and its vectors calibrate to coherent doses where `bipo`'s break the text (docs/vectors.md,
"Learned vectors").

Parametrisation, so that the file serves exactly what training added. A concept's offset at band layer l is
`dose * typical_norm[l] * unit(w[l])`, with one learned `dose = cap * sigmoid(s)` per concept (at most `cap`) and a
learned direction per layer. That is what a vectors file in units "dose" adds at intensity 1.0 when its calibration
is `dose` (`EmotionBank.coefficients`), so the file stores the trained offsets as its vectors, the layers' typical
norms, calibration = the trained dose and the band: intensity 1.0 (and raw alpha 1.0) is the trained strength. The
directions start from the mean difference of the training pairs (`init="diffmean"`) or at random.

Positions are the engine's "response" positions: the last token of the plain question and every answer token (the
engine steers the last prompt token and every generated token); never position 0. The loss reads the answer tokens.

A held-out split (by question) is scored before training (unsteered and at the start), during it and after it; the
losses and the change of the answers' per-token log-probability go into the file's metadata with the hyper-parameters.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..vectors.bank import EmotionBank, model_facts
from .extract import CONTRAST_TEMPLATES, Sample, _batches, _contrast_samples, _pair_samples, decoder_layers, \
    extraction_questions, generate_answers, hook_module, select_pairs
from .pairs import Pair, concepts_of

OBJECTIVES = ("lm", "bipo")
INITS = ("diffmean", "random")
KEEP = ("best", "last")


def _log(message: str) -> None:
    """Progress lines beside the bars, on stderr (stdout carries the results)."""
    tqdm.write(message, file=sys.stderr)


class LearnedError(ValueError):
    """Input the learned recipe cannot use; the message is one line."""


@dataclass(frozen=True)
class TrainPair:
    concept: str
    key: str  # the question (or pairs-file line): the held-out split keeps a question's pairs together
    context: tuple[int, ...]  # the plain question (chat template with the generation prompt); () for bare texts
    positive: tuple[int, ...]
    negative: tuple[int, ...]


@dataclass
class Settings:
    objective: str = "lm"
    steps: int = 40
    lr: float = 0.02
    beta: float = 0.1  # bipo: on sequence log-probabilities (sums over the answer tokens)
    cap: float = 0.4  # the largest relative dose |offset| / typical norm a concept may learn
    band: tuple[int, int] | None = None  # [first, last] layers (default: the middle third)
    pairs_per_step: int = 4  # per concept
    micro_batch: int = 16  # sequences per forward (gradients accumulate over a step's micro-batches)
    held_out: float = 0.2  # share of each concept's questions held out
    max_answer_tokens: int | None = None  # train on the first N answer tokens (None: all)
    init: str = "diffmean"
    keep: str = "best"  # per concept, the offsets of its best held-out evaluation ("last": those of the last step)
    evals: int = 4  # held-out evaluations during training (besides the one before and the one after)
    seed: int = 0


def default_band(num_layers: int) -> tuple[int, int]:
    """The middle third of the layers (10-19 of SmolLM2's 30), where the bundled vectors' calibration steers."""
    first = round(num_layers / 3)
    return first, max(first, round(2 * num_layers / 3) - 1)


def check_settings(settings: Settings, num_layers: int) -> tuple[int, int]:
    """The band the settings train on; refuses what cannot be trained (one line)."""
    if settings.objective not in OBJECTIVES:
        raise LearnedError(f"unknown objective {settings.objective!r}; known: {', '.join(OBJECTIVES)}")
    if settings.init not in INITS:
        raise LearnedError(f"unknown init {settings.init!r}; known: {', '.join(INITS)}")
    if settings.keep not in KEEP:
        raise LearnedError(f"unknown keep {settings.keep!r}; known: {', '.join(KEEP)}")
    band = tuple(settings.band) if settings.band is not None else default_band(num_layers)
    if len(band) != 2 or not 0 <= band[0] <= band[1] < num_layers:
        raise LearnedError(f"band {list(band)} is outside the model: it has layers 0-{num_layers - 1} "
                           "(give --layers FIRST LAST with 0 <= FIRST <= LAST)")
    for name in ("steps", "pairs_per_step", "micro_batch"):
        if getattr(settings, name) < 1:
            raise LearnedError(f"{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    if settings.evals < 0:
        raise LearnedError(f"evals must be at least 0, got {settings.evals}")
    if not (math.isfinite(settings.cap) and 0 < settings.cap <= 10):
        raise LearnedError(f"cap must be a relative dose in (0, 10], got {settings.cap}")
    if not (math.isfinite(settings.lr) and settings.lr > 0) or not (math.isfinite(settings.beta) and settings.beta > 0):
        raise LearnedError(f"lr and beta must be positive, got lr {settings.lr}, beta {settings.beta}")
    if not 0 <= settings.held_out < 1:
        raise LearnedError(f"held-out must be a share in [0, 1), got {settings.held_out}")
    if settings.max_answer_tokens is not None and settings.max_answer_tokens < 1:
        raise LearnedError(f"max-answer-tokens must be at least 1, got {settings.max_answer_tokens}")
    return int(band[0]), int(band[1])


# ---------------------------------------------------------------------------------------------- the training data


def answer(samples: list[Sample], tokenizer, *, generate=None, model=None, max_new_tokens: int = 48,
           batch_size: int = 16, eos: set[int] | None = None) -> None:
    """Fill in the samples' answers: `generate(prompts, max_new_tokens, eos)` (vLLM) or transformers on `model`."""
    to_answer = [s for s in samples if not s.answer_ids]
    if not to_answer:
        return
    prompts = [s.prompt_ids for s in to_answer]
    if generate is not None:
        answers = generate(prompts, max_new_tokens, eos or {tokenizer.eos_token_id})
    else:
        with tqdm(total=-(-len(prompts) // batch_size), desc="learned: answers (transformers)", unit="batch") as bar:
            answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, bar)
    for sample, ids in zip(to_answer, answers):
        sample.answer_ids = ids if ids else [tokenizer.eos_token_id]
        sample.text = tokenizer.decode(ids, skip_special_tokens=True).strip()


def training_pairs(samples: list[Sample], concepts) -> list[TrainPair]:
    """Positive (emotional) answers with the negative (plain) answer to the same question, both after the plain
    question; only samples kept for the concept (the contrast recipe's filter) pair up."""
    neutral = {}
    for s in samples:
        if s.condition == "neutral":
            neutral[s.question] = s
    pairs = []
    for concept in concepts:
        for s in samples:
            n = neutral.get(s.question)
            if (s.condition == "emotional" and s.emotion == concept and concept in s.kept_for and n is not None
                    and concept in n.kept_for):
                pairs.append(TrainPair(concept, s.question, tuple(n.context), tuple(s.answer_ids),
                                       tuple(n.answer_ids)))
    return pairs


def gather(tokenizer, *, emotions=(), pairs: list[Pair] | None = None, questions: int = 100,
           templates=CONTRAST_TEMPLATES, filter_pairs: bool = True, seed: int = 0, **answering
           ) -> tuple[list[TrainPair], list[str], dict]:
    """The training pairs of the contrast recipe (questions, emotional and plain answers, the scorers' filter) or of
    a pairs file; returns them, the concepts and what the file's metadata says about the data."""
    if pairs is not None:
        concepts = concepts_of(pairs)
        samples = _pair_samples(tokenizer, pairs)
        source = {"data": "pairs", "pairs": len(pairs)}
    else:
        concepts = list(emotions)
        pool = extraction_questions()
        if questions > len(pool):
            raise LearnedError(f"the contrast recipe has {len(pool)} questions, asked for {questions}")
        samples = _contrast_samples(tokenizer, concepts, random.Random(seed).sample(pool, questions), templates)
        source = {"data": "contrast", "source": "vllm_emosteer/data/extraction_prompts.txt",
                  "questions_per_emotion": questions, "templates": {"emotional": [list(t) for t in templates],
                                                                    "neutral": "{question}"}}
    answer(samples, tokenizer, **answering)
    if pairs is None and filter_pairs:
        source["contrast"] = select_pairs(samples, concepts)
    source["filtered"] = pairs is None and filter_pairs
    return training_pairs(samples, concepts), concepts, source


def split(pairs: list[TrainPair], concepts, share: float, seed: int) -> tuple[list[TrainPair], list[TrainPair]]:
    """Per concept, a share of its questions (at least one) held out with all their pairs."""
    rng = random.Random(seed)
    train, held = [], []
    for concept in concepts:
        mine = [p for p in pairs if p.concept == concept]
        keys = sorted({p.key for p in mine})
        if not keys:
            raise LearnedError(f"no usable pairs for {concept!r} (the filter kept no positive answer with a plain "
                               "answer to the same question); try more questions or --no-filter")
        if share > 0 and len(keys) < 2:
            raise LearnedError(f"{concept!r} has pairs for one question only; the held-out split needs two "
                               "(more questions or pairs, or --held-out 0)")
        rng.shuffle(keys)
        out = set(keys[: max(1, round(share * len(keys)))]) if share > 0 else set()
        train += [p for p in mine if p.key not in out]
        held += [p for p in mine if p.key in out]
    return train, held


# ------------------------------------------------------------------------------------------------------ the model


class _Steering:
    """Forward hooks on the band's hook modules: add per-row offsets on the rows' steered positions, or record the
    unsteered activations (`record`)."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.offsets = None  # [B, band layers, H]
        self.mask = None  # [B, T, 1]
        self.recorded: dict[int, torch.Tensor] | None = None
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index):
        def fn(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if self.recorded is not None:
                self.recorded[index] = hidden.detach()
            if self.offsets is None:
                return None
            hidden = hidden + (self.mask * self.offsets[:, index, None, :]).to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return fn

    def remove(self):
        for handle in self.handles:
            handle.remove()


def positions(context_len: int, total_len: int) -> tuple[int, int, int, int]:
    """(first steered, first answer token, first scored token, end). The engine's "response" positions are the last
    context token and the answer, never position 0. The loss reads the answer tokens that a steered position
    predicts (all of them after a question; without one, the first answer token's successor is predicted by
    position 0, which no steering changes). Typical norms are over the answer tokens, as in extraction."""
    first, answer_from = max(context_len - 1, 1), max(context_len, 1)
    return first, answer_from, max(answer_from, first + 1), total_len


def _batch(seqs: list[tuple[tuple[int, ...], int]], pad: int, device):
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros(len(seqs), width, dtype=torch.long)
    steer = torch.zeros(len(seqs), width, 1)
    scored = torch.zeros(len(seqs), width, dtype=torch.bool)  # the token at t is an answer token to score
    for row, (seq, context_len) in enumerate(seqs):
        first, _, scored_from, end = positions(context_len, len(seq))
        ids[row, :end] = torch.tensor(seq)
        attention[row, :end] = 1
        steer[row, first:end] = 1.0
        scored[row, scored_from:end] = True
    return ids.to(device), attention.to(device), steer.to(device), scored.to(device)


def _sum_logprobs(logits, ids, where):
    """Per row, the sum of log p(ids[t + 1]) over the t where `where[:, t]`, from logits[:, t] (float32)."""
    picked = logits[where].float().log_softmax(-1)  # [scored tokens, V]: only where a scored token follows
    token_lp = picked.gather(-1, ids[:, 1:][where][:, None])[:, 0]
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(where)[where]
    return torch.zeros(ids.shape[0], device=ids.device).index_add(0, rows, token_lp)


def answer_logprobs(model, steering: _Steering, seqs, pad: int, offsets: torch.Tensor | None = None,
                    prefixes: "_Prefixes | None" = None):
    """Per sequence, the sum of its scored answer tokens' log-probabilities ([B], float32) and their count;
    `offsets` ([B, band layers, H]) steer the rows' steered positions, None runs the unsteered model. With
    `prefixes`, the unsteered tokens before the first steered position come from their cached keys and values."""
    if prefixes is not None:
        return prefixes.logprobs(steering, seqs, pad, offsets)
    device = next(model.parameters()).device
    ids, attention, steer, scored = _batch(seqs, pad, device)
    where = scored[:, 1:]  # logits at t predict the token at t + 1
    keep = int(where.any(0).nonzero().min()) if where.any() else 0  # no logits before the first scored prediction
    steering.offsets, steering.mask = offsets, steer
    try:
        logits = _logits(model, torch.arange(keep, ids.shape[1] - 1, device=device), input_ids=ids,
                         attention_mask=attention, use_cache=False)
    finally:
        steering.offsets = steering.mask = None
    if logits.shape[1] != ids.shape[1] - 1 - keep:  # a model without logits_to_keep: every position's logits
        logits = logits[:, keep: ids.shape[1] - 1]
    return _sum_logprobs(logits, ids[:, keep:], where[:, keep:]), scored.sum(1).float()


def _logits(model, keep, **inputs):
    """The model's logits at the positions `keep` (all of them where the model's forward cannot choose)."""
    try:
        return model(**inputs, logits_to_keep=keep).logits
    except TypeError as exc:
        if "logits_to_keep" not in str(exc):
            raise
        return model(**inputs).logits


class _Prefixes:
    """Keys and values of the unsteered tokens before each sequence's first steered position (the question up to
    its last token), computed once per distinct prefix: a training step then runs only the steered tokens. A
    question's prefix is shared by both answers and every concept. Used when a check on the first batch finds it
    equal to the full forward (architectures whose cache does not fit, e.g. a prefix beyond a sliding window, run
    the full sequences)."""

    def __init__(self, model):
        self.model = model
        self.kv: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @staticmethod
    def split(seq, context_len):
        first = positions(context_len, len(seq))[0]
        return tuple(seq[:first]), tuple(seq[first:])

    @torch.no_grad()
    def _get(self, prefix):
        if prefix not in self.kv:
            device = next(self.model.parameters()).device
            cache = self.model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values
            layers = getattr(cache, "layers", None)
            pairs = ([(layer.keys, layer.values) for layer in layers] if layers is not None
                     else list(zip(cache.key_cache, cache.value_cache)))
            self.kv[prefix] = [(k[0].detach(), v[0].detach()) for k, v in pairs]
        return self.kv[prefix]

    def logprobs(self, steering, seqs, pad: int, offsets):
        from transformers import DynamicCache

        model = self.model
        device = next(model.parameters()).device
        parts = [self.split(seq, n) for seq, n in seqs]
        kvs = [self._get(prefix) for prefix, _ in parts]
        longest = max(len(prefix) for prefix, _ in parts)
        width = max(len(rest) for _, rest in parts)
        batch = len(seqs)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        attention = torch.zeros(batch, longest + width, dtype=torch.long)
        position_ids = torch.zeros(batch, width, dtype=torch.long)
        steer = torch.zeros(batch, width, 1)
        scored = torch.zeros(batch, width, dtype=torch.bool)  # rest token j is scored (predicted by j - 1)
        for row, ((prefix, rest), (seq, n)) in enumerate(zip(parts, seqs)):
            ids[row, : len(rest)] = torch.tensor(rest)
            attention[row, longest - len(prefix): longest + len(rest)] = 1  # the prefix left-padded, the rest right
            position_ids[row] = len(prefix) + torch.arange(width)
            steer[row, : len(rest)] = 1.0
            scored[row, positions(n, len(seq))[2] - len(prefix): len(rest)] = True
        cache = DynamicCache(config=model.config)
        for layer in range(len(kvs[0])):
            k0, v0 = kvs[0][layer]
            keys = k0.new_zeros((batch, k0.shape[0], longest, k0.shape[-1]))
            values = v0.new_zeros((batch, v0.shape[0], longest, v0.shape[-1]))
            for row, kv in enumerate(kvs):
                k, v = kv[layer]
                keys[row, :, longest - k.shape[1]:] = k
                values[row, :, longest - v.shape[1]:] = v
            cache.update(keys, values, layer)
        ids, attention, position_ids = ids.to(device), attention.to(device), position_ids.to(device)
        steering.offsets, steering.mask = offsets, steer.to(device)
        try:
            logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids, past_key_values=cache,
                           use_cache=True).logits
        finally:
            steering.offsets = steering.mask = None
        scored = scored.to(device)
        return _sum_logprobs(logits[:, :-1], ids, scored[:, 1:]), scored.sum(1).float()


class _Learner:
    """The offsets of every concept: offset[c, l] = cap * sigmoid(s[c]) * typical_norm[l] * unit(w[c, l])."""

    def __init__(self, directions: torch.Tensor, typical_norms: torch.Tensor, cap: float):
        self.w = directions.clone().requires_grad_(True)  # [E, band layers, H] float32
        self.s = torch.zeros(directions.shape[0], device=directions.device, requires_grad=True)
        self.norms, self.cap = typical_norms, cap

    def doses(self) -> torch.Tensor:
        return self.cap * torch.sigmoid(self.s)

    def offsets(self) -> torch.Tensor:
        unit = self.w / self.w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.doses()[:, None, None] * self.norms[None, :, None] * unit


def _seq(context, answer, limit):
    answer = answer[:limit] if limit else answer
    return tuple(context) + tuple(answer), len(context)


class _Trainer:
    def __init__(self, model, pairs: list[TrainPair], concepts, hook: str, band, settings: Settings, pad: int,
                 prefix_cache: bool = True, log=_log):
        self.model, self.concepts, self.settings, self.pad, self.log = model, list(concepts), settings, pad, log
        layers = decoder_layers(model)
        self.steering = _Steering([hook_module(layers[i], hook) for i in range(band[0], band[1] + 1)])
        # every distinct sequence once (a question's plain answer serves every emotion and both templates)
        self.seqs: dict[tuple, tuple] = {}
        for p in pairs:
            for side in (p.positive, p.negative):
                seq = _seq(p.context, side, settings.max_answer_tokens)
                self.seqs.setdefault(seq, seq)
        self.base: dict[tuple, tuple[float, float]] = {}  # sequence -> (unsteered log p, scored tokens)
        self.prefixes = _Prefixes(model) if prefix_cache else None

    def seq(self, pair: TrainPair, side: str):
        return _seq(pair.context, getattr(pair, side), self.settings.max_answer_tokens)

    def _check_prefixes(self, chunk) -> None:
        """The cached-prefix forward must give the full forward's log-probabilities, else it is not used."""
        full, _ = answer_logprobs(self.model, self.steering, chunk, self.pad)
        try:
            cached, _ = answer_logprobs(self.model, self.steering, chunk, self.pad, prefixes=self.prefixes)
            exact = next(self.model.parameters()).dtype == torch.float32
            worst = float(((cached - full).abs() / full.abs().clamp_min(1.0)).max())
            ok = worst <= (1e-4 if exact else 2e-2)
        except Exception as exc:  # a cache layout this path does not know
            worst, ok = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}", False
        if not ok:
            self.log(f"learned: cached question prefixes differ from the full forward ({worst}); training runs "
                     "the full sequences")
            self.prefixes = None

    @torch.no_grad()
    def reference(self, train: list[TrainPair]):
        """The unsteered model over every sequence: log-probabilities, the band's typical norms (median token norm
        over the answer tokens) and, per sequence, the mean activation over the steered positions."""
        means, norms = {}, []
        ordered = sorted(self.seqs, key=lambda s: len(s[0]))
        chunks = list(_batches(ordered, self.settings.micro_batch))
        if self.prefixes is not None:
            self._check_prefixes(chunks[-1])  # the longest sequences
        self.steering.recorded = {}
        try:
            for chunk in tqdm(chunks, desc="learned: unsteered pass", unit="batch"):
                lp, count = answer_logprobs(self.model, self.steering, chunk, self.pad, prefixes=self.prefixes)
                stacked = torch.stack([self.steering.recorded[i].float() for i in range(len(self.steering.handles))],
                                      dim=1)  # [B, band layers, T, H]; with prefixes, T starts at the first steered
                for row, (seq, context_len) in enumerate(chunk):
                    first, answer_from, _, end = positions(context_len, len(seq))
                    start = first if self.prefixes is not None else 0
                    self.base[(seq, context_len)] = (float(lp[row]), float(count[row]))
                    means[(seq, context_len)] = stacked[row, :, first - start: end - start].mean(1).cpu()
                    norms.append(stacked[row, :, answer_from - start: end - start].norm(dim=-1).cpu())
        finally:
            self.steering.recorded = None
        typical = torch.cat(norms, dim=1).median(dim=1).values  # the lower median, as extraction's
        diffs = torch.zeros(len(self.concepts), typical.shape[0], means[ordered[0]].shape[-1])
        for p in train:
            diffs[self.concepts.index(p.concept)] += means[self.seq(p, "positive")] - means[self.seq(p, "negative")]
        return typical, diffs

    def losses(self, learner: _Learner | None, pairs: list[TrainPair], grad_scale: torch.Tensor | None = None):
        """Per pair: the objective's loss and the change of the answers' per-token log-probability (positive,
        negative) against the unsteered model. With `grad_scale` (per pair), the weighted sum is backpropagated
        micro-batch by micro-batch."""
        objective, beta = self.settings.objective, self.settings.beta
        per_pair = 1 if objective == "lm" and grad_scale is not None else 2  # held-out: both sides, for the report
        out = []
        for chunk in _batches(list(range(len(pairs))), max(1, self.settings.micro_batch // per_pair)):
            seqs, rows = [], []
            for i in chunk:
                seqs.append(self.seq(pairs[i], "positive"))
                rows.append(self.concepts.index(pairs[i].concept))
                if per_pair == 2:
                    seqs.append(self.seq(pairs[i], "negative"))
                    rows.append(rows[-1])
            with torch.set_grad_enabled(grad_scale is not None):
                offsets = learner.offsets()[torch.tensor(rows, device=learner.w.device)] if learner else None
                lp, count = answer_logprobs(self.model, self.steering, seqs, self.pad, offsets, self.prefixes)
                base = torch.tensor([self.base[s][0] for s in seqs], device=lp.device)
                pos_lp, pos_base, pos_n = lp[0::per_pair], base[0::per_pair], count[0::per_pair]
                neg_delta = torch.full_like(pos_lp, float("nan"))
                if per_pair == 2:
                    neg_lp, neg_base, neg_n = lp[1::2], base[1::2], count[1::2]
                    neg_delta = (neg_lp - neg_base) / neg_n
                if objective == "lm":
                    loss = -pos_lp / pos_n
                else:
                    loss = -F.logsigmoid(beta * ((pos_lp - pos_base) - (neg_lp - neg_base)))
                if grad_scale is not None:
                    (loss * grad_scale[chunk]).sum().backward()
            out += list(zip(loss.tolist(), ((pos_lp - pos_base) / pos_n).tolist(), neg_delta.tolist()))
        return out

    def evaluate(self, learner: _Learner | None, held: list[TrainPair]) -> dict:
        """Held-out loss per concept and overall (mean over concepts), and the per-token log-probability changes."""
        if not held:
            return {}
        if learner is None and self.settings.objective == "bipo":  # v = 0: the margin is 0 by construction
            rows = [(math.log(2.0), 0.0, 0.0) for _ in held]
        elif learner is None:
            rows = [(-self.base[self.seq(p, "positive")][0] / self.base[self.seq(p, "positive")][1], 0.0, float("nan"))
                    for p in held]
        else:
            rows = self.losses(learner, held)
        result = {}
        for concept in self.concepts:
            mine = [r for r, p in zip(rows, held) if p.concept == concept]
            result[concept] = {"loss": _mean(r[0] for r in mine), "delta_logp_positive": _mean(r[1] for r in mine),
                               "delta_logp_negative": _mean(r[2] for r in mine), "pairs": len(mine)}
        result["loss"] = _mean(result[c]["loss"] for c in self.concepts)
        return result


def _mean(values) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return round(sum(values) / len(values), 6) if values else None


def train(model, pairs: list[TrainPair], concepts, *, hook: str = "attn_out", settings: Settings | None = None,
          pad_id: int = 0, model_name: str | None = None, data: dict | None = None, prefix_cache: bool = True,
          log=_log) -> EmotionBank:
    """Train one offset per band layer for each concept (`settings`), and return it as a vectors file (units "dose",
    calibration = the trained dose, bands = the band, the recipe and the held-out losses in its metadata).
    `prefix_cache`: run the question's unsteered tokens once and train on the steered ones (checked against the
    full forward on the first batch)."""
    settings = settings or Settings()
    started = time.monotonic()
    num_layers = len(decoder_layers(model))
    band = check_settings(settings, num_layers)
    concepts = list(concepts)
    if not pairs:
        raise LearnedError("no training pairs (an empty pairs file, or the filter kept nothing)")
    missing = [c for c in concepts if not any(p.concept == c for p in pairs)]
    if missing:
        raise LearnedError(f"no usable pairs for {missing} (try more questions or --no-filter)")
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    train_pairs, held = split(pairs, concepts, settings.held_out, settings.seed)
    device = next(model.parameters()).device
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    trainer = _Trainer(model, pairs, concepts, hook, band, settings, pad_id, prefix_cache, log)
    try:
        typical, diffs = trainer.reference(train_pairs)
        if settings.init == "random":
            diffs = torch.randn(diffs.shape, generator=torch.Generator().manual_seed(settings.seed))
        # a direction the pairs do not define (no difference) starts at random
        empty = diffs.norm(dim=-1) == 0
        diffs[empty] = torch.randn(int(empty.sum()), diffs.shape[-1], generator=torch.Generator().manual_seed(1))
        directions = diffs / diffs.norm(dim=-1, keepdim=True)
        learner = _Learner(directions.to(device), typical.to(device), settings.cap)
        optimizer = torch.optim.Adam([learner.w, learner.s], lr=settings.lr)
        kept: dict[str, dict] = {}  # per concept: the offsets at its best (or last) held-out evaluation

        def keep(step, result):
            offsets, doses = learner.offsets().detach().float().cpu(), learner.doses().detach().cpu()
            for i, concept in enumerate(concepts):
                mine = result.get(concept, {})
                if (concept not in kept or settings.keep == "last" or not held
                        or mine["loss"] < kept[concept]["result"]["loss"]):
                    kept[concept] = {"step": step, "offsets": offsets[i], "dose": float(doses[i]), "result": mine}

        start = trainer.evaluate(learner, held)
        keep(0, start)
        unsteered = trainer.evaluate(None, held)  # from the unsteered pass: training does not change it
        history = [{"step": 0, "unsteered": unsteered.get("loss"), "held_out": start.get("loss")}]
        if held:
            log(f"learned ({settings.objective}): held-out loss unsteered {history[0]['unsteered']:.4f}, "
                f"at the start {history[0]['held_out']:.4f} ({len(held)} pairs)")
        order = {c: [] for c in concepts}
        by_concept = {c: [p for p in train_pairs if p.concept == c] for c in concepts}
        every = max(1, settings.steps // (settings.evals + 1)) if settings.evals else settings.steps + 1
        train_loss = None
        with tqdm(total=settings.steps, desc=f"learned: training ({settings.objective})", unit="step") as bar:
            for step in range(1, settings.steps + 1):
                chosen, scale = [], []
                for concept in concepts:
                    mine = by_concept[concept]
                    take = min(settings.pairs_per_step, len(mine))
                    for _ in range(take):
                        if not order[concept]:  # a new epoch of this concept's pairs, in a new order
                            order[concept] = rng.sample(range(len(mine)), len(mine))
                        chosen.append(mine[order[concept].pop()])
                        scale.append(1.0 / take)  # each concept's mean; the concepts' losses add up
                optimizer.zero_grad(set_to_none=True)
                rows = trainer.losses(learner, chosen, torch.tensor(scale, device=device))
                optimizer.step()
                train_loss = sum(r[0] * s for r, s in zip(rows, scale)) / len(concepts)
                bar.set_postfix(loss=f"{train_loss:.4f}", dose=",".join(f"{d:.2f}" for d in learner.doses().tolist()))
                bar.update(1)
                if held and (step % every == 0 or step == settings.steps):
                    result = trainer.evaluate(learner, held)
                    keep(step, result)
                    history.append({"step": step, "train": round(train_loss, 6), "held_out": result["loss"]})
                    log(f"learned: step {step}: train loss {train_loss:.4f}, held-out loss {result['loss']:.4f}")
        if not held:
            keep(settings.steps, {})
        offsets = torch.stack([kept[c]["offsets"] for c in concepts])  # [E, band layers, H]
        doses = [kept[c]["dose"] for c in concepts]
        final = {c: kept[c]["result"] for c in concepts}
        if held:
            final["loss"] = _mean(final[c]["loss"] for c in concepts)
    finally:
        trainer.steering.remove()
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)
    per_concept = {}
    for i, concept in enumerate(concepts):
        per_concept[concept] = {
            "dose": round(doses[i], 6),
            "kept_step": kept[concept]["step"],
            "train_pairs": sum(p.concept == concept for p in train_pairs),
            "held_out_pairs": sum(p.concept == concept for p in held),
            "held_out": {"unsteered": unsteered.get(concept, {}).get("loss"), **final.get(concept, {})},
        }
    seconds = time.monotonic() - started
    details = {
        "recipe": "learned",
        "method": {"bipo": "offsets trained to raise log p(positive) - log p(negative) against the unsteered model "
                           "(-logsigmoid(beta * margin), BiPO/RePS-like)",
                   "lm": "offsets trained on the LM loss of the positive answers after the plain question "
                         "(prompt distillation)"}[settings.objective],
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "band": list(band),
        "parametrisation": "offset = dose * typical_norm * unit(w), dose = cap * sigmoid(s) per concept",
        "positions": "last context token and answer tokens (the engine's 'response'), position 0 excluded",
        "held_out_loss": {"unsteered": unsteered.get("loss"), "start": history[0]["held_out"],
                          "loss": final.get("loss"), "history": history},
        "train_loss": None if train_loss is None else round(train_loss, 6),
        "concepts": per_concept,
        "device": str(device),
        "prefix_cache": trainer.prefixes is not None,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "seconds": round(seconds, 1),
        **(data or {}),
    }
    vectors = offsets.permute(1, 0, 2).contiguous()  # [band layers, E, H]: the trained offsets themselves
    return EmotionBank(vectors=vectors, emotions=concepts, hook=hook, layers=list(range(band[0], band[1] + 1)),
                       model=model_facts(model.config, model_name), recipe=details, units="dose",
                       typical_norms=[float(v) for v in typical], calibration={c: d for c, d in zip(concepts, doses)},
                       bands={c: list(band) for c in concepts})


def summary(bank: EmotionBank) -> str:
    """The held-out table `extract --recipe learned` prints."""
    recipe = bank.recipe
    first, last = recipe["band"]
    lines = [f"learned ({recipe['objective']}, {recipe['steps']} steps, layers {first}-{last}, "
             f"cap {recipe['cap']}, {recipe['seconds']:.0f} s on {recipe['device']}): held-out loss, unsteered -> "
             "trained; change of the answers' per-token log-probability against the unsteered model",
             "| concept | trained dose | kept step | pairs (train / held out) | held-out loss | d logp positive | "
             "d logp negative |", "|---|---|---|---|---|---|---|"]

    def cell(value, form="{:.3f}"):
        return "-" if value is None else form.format(value)

    for concept, row in recipe["concepts"].items():
        held = row["held_out"]
        lines.append(f"| {concept} | {row['dose']:.3f} | {row['kept_step']} | {row['train_pairs']} / "
                     f"{row['held_out_pairs']} | "
                     f"{cell(held.get('unsteered'), '{:.4f}')} -> {cell(held.get('loss'), '{:.4f}')} | "
                     f"{cell(held.get('delta_logp_positive'), '{:+.3f}')} | "
                     f"{cell(held.get('delta_logp_negative'), '{:+.3f}')} |")
    return "\n".join(lines)

