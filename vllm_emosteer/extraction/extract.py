"""Extract emotion vectors, inside vLLM (`vllm_capture.py`) or with transformers (here, the reference).

Two recipes, both "mean activation of emotional answers minus that of neutral answers, per layer":

* contrast (default): the bundled neutral everyday questions (`data/extraction_prompts.txt`, none of them in the
  eval prompts). Each question is answered plainly (neutral) and with an emotion instruction in the user turn
  (the 135M default model half-ignores emotional *system* prompts). Both answers are then teacher-forced after
  the plain question, so the contrast is the answer's emotion, not the instruction's words: the state that
  steering must recreate when a user asks a plain question. Pairs are kept only where the emotional answer
  reads as its emotion (NADE or MiniLM prototypes put it first, little repetition) and the neutral answer does
  not. The file stores units "dose" and each layer's typical activation norm.
* pairs: the user's own concepts from a pairs file (`pairs.py`), answered and captured like the contrast recipe;
  units "dose".
* paper: Dong et al.'s recipe. N EmotionQuery questions of each emotion answered under a neutral and an
  emotional system prompt; activations captured under each answer's own prompt; units "alpha".

Activations are averaged over the last context token and the answer tokens, never position 0 (the attention
sink, ~170x the norm of other tokens in SmolLM2).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from importlib import resources

import torch
from tqdm.auto import tqdm

from ..engine.worker.capture import MAX_FINISHED
from ..model_layers import ATTENTION_NAMES, attention_module
from ..emotions import EMOTIONAL_INSTRUCTION, EMOTIONS, describe
from ..vectors.bank import EmotionBank, model_facts
from .pairs import Pair, PairsError, concepts_of

RECIPES = ("contrast", "paper", "pairs")
# contrast recipe: how the emotional answers are asked for, each a (role, text) with {question}, {emotion} and
# {description} (DESCRIPTIONS, or "extremely {emotion}"). Every question is asked both ways: which one makes the
# 135M default model write the emotion differs by emotion (the user turn for anger and fear, the system prompt
# for disgust), and the scorers keep what worked.
CONTRAST_TEMPLATES = (
    ("user", EMOTIONAL_INSTRUCTION),
    ("system", "You are overwhelmed by {emotion}. Answer the question and let your {emotion} show strongly in "
               "every sentence."),
)
MIN_DISTINCT2 = 0.5  # contrast recipe: emotional answers that loop more than this are not kept
TEMPLATES = {
    "neutral": (
        "You are a calm assistant. Answer the question in a neutral, matter-of-fact tone "
        "and do not express any emotion."
    ),
    "emotional": (
        "You are overwhelmed by {emotion}. Answer the question and let your {emotion} show "
        "strongly in every sentence."
    ),
}


@dataclass
class Sample:
    emotion: str
    condition: str  # "neutral" or "emotional"
    question: str
    prompt_ids: list[int]  # what the answer was generated from
    answer_ids: list[int]
    context_ids: list[int] | None = None  # what the answer is teacher-forced after (default: prompt_ids)
    text: str = ""
    kept_for: tuple[str, ...] = ()  # the emotions whose vector this sample goes into
    asked_in: str = ""  # contrast recipe: where the emotion was asked for ("user" or "system" turn)

    @property
    def context(self) -> list[int]:
        return self.prompt_ids if self.context_ids is None else self.context_ids


def load_questions() -> dict[str, list[str]]:
    text = resources.files("vllm_emosteer").joinpath("data/EmotionQuery.json").read_text()
    return json.loads(text)


def decoder_layers(model) -> torch.nn.ModuleList:
    """transformers' decoder layers (`model.model.layers`, or a multimodal model's language model's)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        layers = getattr(getattr(inner, "language_model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


def hook_module(layer, hook: str) -> torch.nn.Module:
    """The module whose output is captured: the attention module (found as the engine finds it) or the layer."""
    if hook == "residual":
        return layer
    attention = attention_module(layer)
    if attention is None:
        raise ValueError(f"{type(layer).__name__} has no attention module ({', '.join(ATTENTION_NAMES)})")
    return attention


def extraction_questions() -> list[str]:
    text = resources.files("vllm_emosteer").joinpath("data/extraction_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _prompt_ids(tokenizer, system: str | None, question: str) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, bar):
    """Greedy answers, batched with left padding; each answer is cut at the first end-of-sequence token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = model.generation_config.eos_token_id or tokenizer.eos_token_id
    eos = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    answers = []
    for batch in _batches(prompts, batch_size):
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad,
        )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            answers.append(row[:cut])
        bar.update(1)
    return answers


@torch.no_grad()
def mean_activations(model, samples: list[Sample], hook: str, batch_size: int, bar) -> tuple[torch.Tensor, list[float]]:
    """Per sample, the mean activation over its steered positions at every layer ([N, L, H] float64), and per
    layer the median token norm over the answer tokens of all samples (the typical norm a dose is relative to)."""
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def capture(index):
        def fn(_module, _args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [hook_module(layer, hook).register_forward_hook(capture(i)) for i, layer in enumerate(layers)]
    means, token_norms = [], []
    try:
        for batch in _batches(samples, batch_size):
            seqs = [s.context + s.answer_ids for s in batch]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=model.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=model.device)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            # steered positions: last context token .. last answer token, never position 0
            select = torch.zeros(len(batch), width)
            answer = torch.zeros(len(batch), width, dtype=torch.bool)
            for row, s in enumerate(batch):
                first, end = max(len(s.context) - 1, 1), len(s.context) + len(s.answer_ids)
                select[row, first:end] = 1.0
                answer[row, max(len(s.context), 1):end] = True
            weights = (select / select.sum(1, keepdim=True)).double()
            stacked = torch.stack([captured[i].double().cpu() for i in range(len(layers))], dim=1)  # [B, L, T, H]
            means.append(torch.einsum("blth,bt->blh", stacked, weights))
            token_norms.append(stacked.norm(dim=-1).permute(1, 0, 2)[:, answer])  # [L, answer tokens]
            bar.update(1)
    finally:
        for handle in handles:
            handle.remove()
    norms = torch.cat(token_norms, dim=1).median(dim=1).values
    return torch.cat(means), [float(v) for v in norms]


def _paper_samples(tokenizer, emotions, questions_per_emotion, templates, rng) -> list[Sample]:
    questions = load_questions()
    samples = []
    for emotion in emotions:
        pool = questions[emotion]
        if questions_per_emotion > len(pool):
            raise ValueError(f"EmotionQuery has {len(pool)} questions for {emotion}, asked for {questions_per_emotion}")
        for question in rng.sample(pool, questions_per_emotion):
            for condition in ("neutral", "emotional"):
                system = templates[condition].format(emotion=emotion)
                samples.append(Sample(emotion, condition, question, _prompt_ids(tokenizer, system, question), [],
                                      kept_for=(emotion,)))
    return samples


def _contrast_samples(tokenizer, emotions, questions: list[str], templates) -> list[Sample]:
    samples = []
    for question in questions:
        plain = _prompt_ids(tokenizer, None, question)
        samples.append(Sample(None, "neutral", question, plain, [], kept_for=tuple(emotions)))
        for emotion in emotions:
            fill = dict(description=describe(emotion), emotion=emotion,
                        question=question)
            for role, template in templates:
                text = template.format(**fill)
                prompt = (_prompt_ids(tokenizer, text, question) if role == "system"
                          else _prompt_ids(tokenizer, None, text))
                samples.append(Sample(emotion, "emotional", question, prompt, [], context_ids=plain,
                                      kept_for=(emotion,), asked_in=role))
    return samples


def _pair_samples(tokenizer, pairs: list[Pair]) -> list[Sample]:
    """Two samples per pair: its positive ("emotional") and negative ("neutral") side, keyed by the pair's line."""
    samples = []
    for pair in pairs:
        key = f"line {pair.line}"
        plain = _prompt_ids(tokenizer, None, pair.question) if pair.question else []
        sides = (("emotional", pair.positive, pair.positive_text), ("neutral", pair.negative, pair.negative_text))
        for condition, instruction, text in sides:
            if text is None:
                samples.append(Sample(pair.concept, condition, key, _prompt_ids(tokenizer, instruction, pair.question),
                                      [], context_ids=plain, kept_for=(pair.concept,)))
                continue
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(plain) + len(ids) < 3:
                raise PairsError(f"line {pair.line}: the {condition.replace('emotional', 'positive')} text is too "
                                 "short to capture (give a question or a longer text)")
            samples.append(Sample(pair.concept, condition, key, plain, ids, text=text, kept_for=(pair.concept,)))
    return samples


def consistency(means: torch.Tensor, samples: list[Sample], concepts) -> dict[str, dict[str, float | None]]:
    """Per concept and layer band (thirds of the model), the mean pairwise cosine of the per-pair differences
    (emotional minus neutral answer to the same question): consistent differences make reliable vectors
    (arXiv 2505.22637). None: fewer than two pairs."""
    num_layers = means.shape[1]
    third = max(num_layers // 3, 1)
    bands = [(0, third - 1), (third, 2 * third - 1), (2 * third, num_layers - 1)] if num_layers >= 3 else [
        (0, num_layers - 1)]
    table = {}
    for concept in concepts:
        neutral = {s.question: i for i, s in enumerate(samples) if s.condition == "neutral" and concept in s.kept_for}
        diffs = [means[i] - means[neutral[s.question]] for i, s in enumerate(samples)
                 if s.condition == "emotional" and concept in s.kept_for and s.question in neutral]
        n = len(diffs)
        if n < 2:
            table[concept] = {f"{a}-{b}": None for a, b in bands}
            continue
        units = torch.stack(diffs)
        units = units / units.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [n, L, H]
        total = units.sum(0)
        per_layer = ((total * total).sum(-1) - n) / (n * (n - 1))  # mean over pairs i != j of cos(d_i, d_j)
        table[concept] = {f"{a}-{b}": round(float(per_layer[a: b + 1].mean()), 3) for a, b in bands}
    return table


def select_pairs(samples: list[Sample], emotions, skip_missing: bool = False) -> dict[str, dict]:
    """Contrast recipe: keep emotional answers that read as their emotion (NADE or MiniLM ranks it first) and
    loop little; keep, for each emotion, the neutral answers that the two scorers do not both rank as it (the
    default model's plain answers are cheerful: NADE ranks 95% of them joy, so "neither" would leave three).
    Returns the contrast table: per emotion, how emotional and how neutral the answers were, and what was kept.
    An emotion with no kept emotional or no kept neutral answer stops it, or with `skip_missing` is left out
    (its samples kept for nothing, `left_out` in its table row)."""
    from ..scores import distinct2, emotion_scores, prototype_scores, top_emotion

    texts = [s.text for s in samples]
    tops = list(zip([top_emotion(x) for x in emotion_scores(texts)], [top_emotion(x) for x in prototype_scores(texts)]))
    table = {}
    for emotion in emotions:
        emo = [i for i, s in enumerate(samples) if s.emotion == emotion]
        neu = [i for i, s in enumerate(samples) if s.condition == "neutral"]
        for i in emo:
            reads = emotion in tops[i] and distinct2(texts[i]) >= MIN_DISTINCT2
            samples[i].kept_for = (emotion,) if reads else ()
        for i in neu:
            if tops[i] == (emotion, emotion):
                samples[i].kept_for = tuple(e for e in samples[i].kept_for if e != emotion)
        table[emotion] = {
            "emotional_nade_hit": sum(tops[i][0] == emotion for i in emo) / len(emo),
            "emotional_minilm_hit": sum(tops[i][1] == emotion for i in emo) / len(emo),
            "neutral_nade_hit": sum(tops[i][0] == emotion for i in neu) / len(neu),
            "neutral_minilm_hit": sum(tops[i][1] == emotion for i in neu) / len(neu),
            "emotional_kept": sum(bool(samples[i].kept_for) for i in emo),
            "neutral_kept": sum(emotion in samples[i].kept_for for i in neu),
            "pairs": len(emo),
            "by_placement": {
                role: [sum(tops[i][k] == emotion for i in emo if samples[i].asked_in == role)
                       / max(1, sum(samples[i].asked_in == role for i in emo)) for k in (0, 1)]
                for role in sorted({samples[i].asked_in for i in emo})},
        }
        table[emotion]["left_out"] = not table[emotion]["emotional_kept"] or not table[emotion]["neutral_kept"]
        if table[emotion]["left_out"] and not skip_missing:
            raise ValueError(f"no usable contrast for {emotion}: no emotional answer reads as {emotion}, or no "
                             "neutral answer is free of it; try more questions or another --emotion-template, or "
                             "write the other emotions with --skip-missing")
        if table[emotion]["left_out"]:
            for sample in samples:
                sample.kept_for = tuple(e for e in sample.kept_for if e != emotion)
    if skip_missing and all(row["left_out"] for row in table.values()):
        raise ValueError(f"no usable contrast for any of {list(emotions)}; try more questions or another "
                         "--emotion-template")
    return table


def extract(
    model,
    tokenizer,
    *,
    emotions=EMOTIONS,
    recipe: str = "contrast",
    questions_per_emotion: int = 50,
    hook: str = "attn_out",
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
    templates: dict | None = None,
    filter_pairs: bool = True,
    model_name: str | None = None,
    generate=None,
    pairs: list[Pair] | None = None,
    pairs_source: str | None = None,
    engine=None,
    skip_missing: bool = False,
) -> tuple[EmotionBank, list[Sample]]:
    """The vectors of `emotions` by `recipe` (RECIPES); returns the bank and the samples (with the contrast
    table in `bank.recipe["contrast"]` for the contrast recipe when `filter_pairs`). `generate(prompts,
    max_new_tokens, eos_ids)` answers the prompts (default: transformers' generate on `model`). `engine`: a
    `VllmExtractor` that answers and captures inside vLLM (then `model` may be None). `skip_missing`: the
    contrast filter leaves out the emotions without a usable contrast (`bank.recipe["left_out"]`) instead of
    stopping."""
    if engine is not None:
        generate = engine.generate
    if pairs is not None:
        recipe, emotions = "pairs", concepts_of(pairs)
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {list(RECIPES)}")
    templates = {**TEMPLATES, "contrast": CONTRAST_TEMPLATES, **(templates or {})}
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if recipe == "paper":
        samples = _paper_samples(tokenizer, emotions, questions_per_emotion, templates, rng)
    elif recipe == "pairs":
        if pairs is None:
            raise ValueError("the pairs recipe needs pairs (extract --pairs FILE)")
        samples = _pair_samples(tokenizer, pairs)
    else:
        pool = extraction_questions()
        if questions_per_emotion > len(pool):
            raise ValueError(f"the contrast recipe has {len(pool)} questions, asked for {questions_per_emotion}")
        samples = _contrast_samples(tokenizer, emotions, rng.sample(pool, questions_per_emotion), templates["contrast"])

    to_answer = [s for s in samples if not s.answer_ids]  # pairs with ready texts need no answers
    steps = (1 if generate or not to_answer else 2) * -(-len(samples) // batch_size)
    with tqdm(total=steps, desc=f"extract ({recipe}: " + ("capture" if generate else "generate, then capture") + ")",
              unit="batch") as bar:
        if not to_answer:
            answers = []
        elif generate:
            eos_ids = (model.generation_config.eos_token_id if model is not None else None) or tokenizer.eos_token_id
            eos = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
            answers = generate([s.prompt_ids for s in to_answer], max_new_tokens, eos)
        else:
            answers = generate_answers(model, tokenizer, [s.prompt_ids for s in to_answer], max_new_tokens,
                                       batch_size, bar)
        for sample, answer in zip(to_answer, answers):
            sample.answer_ids = answer if answer else [tokenizer.eos_token_id]
            sample.text = tokenizer.decode(answer, skip_special_tokens=True).strip()
        contrast = select_pairs(samples, emotions, skip_missing) if recipe == "contrast" and filter_pairs else None
        left_out = [e for e in emotions if contrast and contrast[e]["left_out"]]
        emotions = [e for e in emotions if e not in left_out]
        samples = [s for s in samples if s.kept_for]  # answers the filter dropped are not captured
        if engine is not None and len(samples) > MAX_FINISHED:
            raise ValueError(f"{len(samples)} answers to capture, but capture mode keeps at most {MAX_FINISHED} "
                             "until they are collected; use fewer questions or pairs, or --engine transformers")
        bar.total = bar.n + -(-len(samples) // batch_size)
        capture = engine.capture if engine is not None else functools.partial(mean_activations, model)
        means, typical_norms = capture(samples, hook, batch_size, bar)  # [N, L, H]

    rows = []
    for emotion in emotions:
        emo = [i for i, s in enumerate(samples) if s.condition == "emotional" and emotion in s.kept_for]
        neu = [i for i, s in enumerate(samples) if s.condition == "neutral" and emotion in s.kept_for]
        rows.append(means[emo].mean(0) - means[neu].mean(0))  # [L, H]
    vectors = torch.stack(rows, dim=1).float()  # [L, E, H]
    details = {
        "recipe": recipe,
        "consistency": consistency(means, samples, emotions),
        "method": "mean(emotional answers) - mean(neutral answers), per layer",
        "source": {"paper": "EmotionQuery (Dong et al. 2025)", "contrast": "vllm_emosteer/data/extraction_prompts.txt",
                   "pairs": pairs_source or "contrast pairs"}[recipe],
        "templates": ({k: templates[k] for k in ("neutral", "emotional")} if recipe == "paper"
                      else {"emotional": [list(t) for t in templates["contrast"]], "neutral": "{question}"}
                      if recipe == "contrast" else "the pairs file's instructions or texts"),
        "questions_per_emotion": questions_per_emotion,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy" + (" (vLLM)" if generate else " (transformers)"),
        "capture": "vLLM (capture mode)" if engine is not None else "transformers",
        "positions": "last context token and answer tokens, position 0 excluded; mean per answer, then over answers",
        "dtype": engine.dtype if engine is not None else str(next(model.parameters()).dtype).replace("torch.", ""),
        "seed": seed,
    }
    if contrast is not None:
        details["contrast"] = contrast
    if left_out:
        details["left_out"] = left_out
    bank = EmotionBank(
        vectors=vectors,
        emotions=list(emotions),
        hook=hook,
        layers=list(range(vectors.shape[0])),
        model=model_facts(engine.config if engine is not None else model.config, model_name),
        recipe=details,
        units="alpha" if recipe == "paper" else "dose",
        typical_norms=typical_norms,
    )
    return bank, samples
