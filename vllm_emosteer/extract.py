"""Extract emotion vectors with the paper's recipe, using transformers on CPU.

For each emotion: answer N questions of that emotion from EmotionQuery twice, once under a neutral instruction
and once under an emotional one (system prompts, see TEMPLATES). Then teacher-force prompt + answer and
capture the activation at the hook point of every layer, average it over the steered positions (the last
prompt token and the answer tokens; never position 0, the attention sink), and take the mean over questions
of emotional minus neutral.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

import torch
from tqdm.auto import tqdm

from .bank import EmotionBank, model_facts

EMOTIONS = ("joy", "anger", "disgust", "fear", "sadness")
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
    prompt_ids: list[int]
    answer_ids: list[int]


def load_questions() -> dict[str, list[str]]:
    text = resources.files("vllm_emosteer").joinpath("data/EmotionQuery.json").read_text()
    return json.loads(text)


def decoder_layers(model) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        layers = getattr(getattr(inner, "language_model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


def hook_module(layer, hook: str) -> torch.nn.Module:
    return layer.self_attn if hook == "attn_out" else layer


def _prompt_ids(tokenizer, system: str, question: str) -> list[int]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
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
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
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
def mean_activations(model, samples: list[Sample], hook: str, batch_size: int, bar) -> torch.Tensor:
    """Per sample, the mean activation over its steered positions at every layer: [N, L, H] float64."""
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def capture(index):
        def fn(_module, _args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [hook_module(layer, hook).register_forward_hook(capture(i)) for i, layer in enumerate(layers)]
    means = []
    try:
        for batch in _batches(samples, batch_size):
            seqs = [s.prompt_ids + s.answer_ids for s in batch]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            # steered positions: last prompt token .. last answer token, never position 0
            select = torch.zeros(len(batch), width)
            for row, s in enumerate(batch):
                first = max(len(s.prompt_ids) - 1, 1)
                select[row, first : len(s.prompt_ids) + len(s.answer_ids)] = 1.0
            weights = (select / select.sum(1, keepdim=True)).double()
            stacked = torch.stack([captured[i].double() for i in range(len(layers))], dim=1)  # [B, L, T, H]
            means.append(torch.einsum("blth,bt->blh", stacked, weights))
            bar.update(1)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(means)


def extract(
    model,
    tokenizer,
    *,
    emotions=EMOTIONS,
    questions_per_emotion: int = 50,
    hook: str = "attn_out",
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
    templates: dict | None = None,
    model_name: str | None = None,
) -> tuple[EmotionBank, list[Sample]]:
    templates = {**TEMPLATES, **(templates or {})}
    questions = load_questions()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    samples: list[Sample] = []
    for emotion in emotions:
        pool = questions[emotion]
        if questions_per_emotion > len(pool):
            raise ValueError(f"EmotionQuery has {len(pool)} questions for {emotion}, asked for {questions_per_emotion}")
        for question in rng.sample(pool, questions_per_emotion):
            for condition in ("neutral", "emotional"):
                system = templates[condition].format(emotion=emotion)
                samples.append(Sample(emotion, condition, question, _prompt_ids(tokenizer, system, question), []))

    steps = 2 * -(-len(samples) // batch_size)
    with tqdm(total=steps, desc="extract (generate, then capture)", unit="batch") as bar:
        answers = generate_answers(model, tokenizer, [s.prompt_ids for s in samples], max_new_tokens, batch_size, bar)
        for sample, answer in zip(samples, answers):
            sample.answer_ids = answer if answer else [tokenizer.eos_token_id]
        means = mean_activations(model, samples, hook, batch_size, bar)  # [N, L, H]

    rows = []
    for emotion in emotions:
        emo = [i for i, s in enumerate(samples) if s.emotion == emotion and s.condition == "emotional"]
        neu = [i for i, s in enumerate(samples) if s.emotion == emotion and s.condition == "neutral"]
        rows.append(means[emo].mean(0) - means[neu].mean(0))  # [L, H]
    vectors = torch.stack(rows, dim=1).float()  # [L, E, H]
    recipe = {
        "method": "mean(emotional answers) - mean(neutral answers), per layer",
        "source": "EmotionQuery (Dong et al. 2025)",
        "templates": templates,
        "questions_per_emotion": questions_per_emotion,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "positions": "last prompt token and answer tokens, position 0 excluded; mean per answer, then over questions",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "seed": seed,
    }
    bank = EmotionBank(
        vectors=vectors,
        emotions=list(emotions),
        hook=hook,
        layers=list(range(vectors.shape[0])),
        model=model_facts(model.config, model_name),
        recipe=recipe,
    )
    return bank, samples
