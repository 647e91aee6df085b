"""Steering quality through the vLLM engine with the plugin: every variant in one batch, judged by two scorers.

For each variant, over the bundled neutral everyday prompts (neither EmotionQuery nor the extraction prompts):
  target      mean NADE score of the target emotion (EPS-like)
  hit_nade    share of answers whose top emotion among the five is the target, by NADE (EAS-like)
  hit_minilm  the same by the MiniLM prototype scorer (NADE almost never ranks anger first)
  sim         cosine (all-MiniLM-L6-v2) between the answer and the unsteered answer to the same prompt
  topic       cosine between the answer and the question
  ppl         perplexity of the answer under the unsteered model (fluency)
  distinct2   distinct word bigrams / word bigrams (repetition: 1 = none)
Variants: unsteered; prompting (the emotion asked for in the user turn, the baseline steering must beat); the
file's calibrated intensities; and sweeps, run on an uncalibrated copy of the file so that an intensity is the
plain dose (units "dose") or alpha (units "alpha"), on a layer band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from ..emotions import EMOTIONAL_INSTRUCTION, EMOTIONS, describe
from ..scores import distinct2, embed, emotion_scores, prototype_scores, top_emotion

# "the text stays coherent and on topic": little repetition, close to the question, fluent (perplexity at most
# this many times the unsteered answers')
THRESHOLDS = {"distinct2": 0.6, "topic": 0.3, "ppl_ratio": 4.0}
# calibration keeps a margin above the 0.6 gate: at a mean distinct-2 of 0.6, many single answers still loop
CALIBRATION_DISTINCT2 = 0.7
CALIBRATION_PROMPTS = 32  # calibrate reads the first 32 neutral prompts by default; eval --claims only the others


def neutral_prompts() -> list[str]:
    text = resources.files("vllm_emosteer").joinpath("data/neutral_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


# layer bands calibration searches, as fractions of the model's depth
BANDS = {"middle third": (1 / 3, 2 / 3), "30-70%": (0.3, 0.7), "middle half": (0.25, 0.75), "all": (0.0, 1.0)}


@dataclass
class Variant:
    label: str
    extra_args: dict | None
    target: tuple[str, ...] = ()
    alpha: float = 0.0  # the swept value: a dose or an alpha (uncalibrated copy), or a calibrated intensity
    group: str = "sweep"  # sweep, calibrated, prompt, mix, positions
    band: tuple[int, int] | None = None
    template: str | None = None  # the user turn, with {question}; None: the question alone
    prompts: tuple[str, ...] | None = None  # its own questions (None: the ones evaluate() is given)
    max_tokens: int | None = None  # its own answer length (None: evaluate()'s)
    reference: str = "unsteered"  # the variant whose answer to the same question `sim` compares with


@dataclass
class EvalResult:
    rows: list[dict] = field(default_factory=list)
    # per variant label, per answer: question, text, nade and minilm scores, coherent (no loop, on topic)
    answers: dict[str, list[dict]] = field(default_factory=dict)

    def row(self, label):
        return next(r for r in self.rows if r["label"] == label)


def band_layers(name: str, num_layers: int) -> tuple[int, int]:
    low, high = BANDS[name]
    return round(low * num_layers), max(round(low * num_layers), round(high * num_layers) - 1)


def sweep_variants(emotions, values, positions="response", bands=(None,)) -> list[Variant]:
    """For an engine on an uncalibrated copy: each emotion at each value (a dose or an alpha) on each band."""
    from ..engine.spec import steer

    variants = [Variant("unsteered", None, alpha=0.0)]
    for emotion in emotions:
        for band in bands:
            for value in values:
                if value == 0:
                    continue
                spec = steer(positions=positions, layers=band, **{emotion: value})
                where = f" L{band[0]}-{band[1]}" if band else ""
                variants.append(Variant(f"{emotion} {value:g}{where}", spec, (emotion,), value, band=band))
    return variants


def calibrated_variants(emotions, intensity: float = 1.0) -> list[Variant]:
    """Each emotion at a calibrated intensity (what a user gets from `steer(joy=1.0)`)."""
    from ..engine.spec import steer

    return [Variant(f"{e} {intensity:g}", steer(**{e: intensity}), (e,), intensity, "calibrated") for e in emotions]


def calibrated_rows(calibration: dict, emotions, intensity: float, source) -> tuple[list[Variant], str | None]:
    """eval's calibrated variants, or none and why: in an uncalibrated file an intensity has no agreed meaning
    (intensity 1.0 would be a plain dose or alpha of 1.0, far past coherent for most models)."""
    if calibration:
        return calibrated_variants(emotions, intensity), None
    return [], (f"{source} has no calibration, so there are no steered rows at --intensity: calibrate it first "
                f"(vllm-emosteer calibrate --vectors {source}), or sweep plain doses or alphas "
                "(e.g. --doses 0.1 0.2 0.4)")


def prompt_variants(emotions) -> list[Variant]:
    """The baseline: no steering, the emotion asked for in the prompt."""
    # the prompting baseline: the emotion asked for in the user turn, in the extraction's own words
    return [Variant(f"prompted {e}", None, (e,), 0.0, "prompt",
                    template=EMOTIONAL_INSTRUCTION.replace("{description}", describe(e)))
            for e in emotions]


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


def evaluate(llm, variants: list[Variant], prompts: list[str], max_tokens: int = 48, progress=True,
             concepts: dict[str, list[str]] | None = None) -> EvalResult:
    """Every variant's answers to its questions (`prompts` unless it has its own), scored, in one batch.
    `concepts`: your own concepts' example sentences; each concept row then says how far steering moved the
    answers toward them (MiniLM), beside the generic metrics."""
    from vllm import SamplingParams

    conversations, params, index = [], [], []  # index: (variant, question) per request
    for v, variant in enumerate(variants):
        for prompt in variant.prompts or prompts:
            content = variant.template.format(question=prompt) if variant.template else prompt
            conversations.append([{"role": "user", "content": content}])
            params.append(SamplingParams(max_tokens=variant.max_tokens or max_tokens, temperature=0,
                                         extra_args=variant.extra_args))
            index.append((v, prompt))
    outputs = llm.chat(conversations, params, use_tqdm=progress)
    texts = [o.outputs[0].text.strip() for o in outputs]
    questions = sorted({p for _, p in index})
    # fluency under the unsteered model, after the plain question (also for the prompted baseline)
    tokenizer = llm.get_tokenizer()
    plain = {}
    for q in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True)
        plain[q] = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ppl = perplexities(llm, [plain[p] for _, p in index], [list(o.outputs[0].token_ids) for o in outputs])
    scores, prototypes = emotion_scores(texts), prototype_scores(texts)
    answer_vecs = embed(texts)
    question_vecs = dict(zip(questions, embed(questions)))
    topic = [float(answer_vecs[i] @ question_vecs[p]) for i, (_, p) in enumerate(index)]
    ok = [distinct2(t) >= THRESHOLDS["distinct2"] and c >= THRESHOLDS["topic"] for t, c in zip(texts, topic)]
    answer_of = {(variants[v].label, p): i for i, (v, p) in enumerate(index)}
    concept_scores = concept_matrix(answer_vecs, concepts) if concepts else {}
    result = EvalResult()
    for v, variant in enumerate(variants):
        items = [i for i, (vv, _) in enumerate(index) if vv == v]
        base = [answer_of.get((variant.reference, index[i][1])) for i in items]
        base = base if all(b is not None for b in base) else None
        row = {"label": variant.label, "group": variant.group, "emotions": list(variant.target),
               "alpha": variant.alpha, "band": list(variant.band) if variant.band else None, "answers": len(items)}
        tops = [top_emotion(scores[i]) for i in items]
        tops_minilm = [top_emotion(prototypes[i]) for i in items]
        for emotion in EMOTIONS:
            row[f"score_{emotion}"] = float(np.mean([scores[i][emotion] for i in items]))
            row[f"top_{emotion}"] = float(np.mean([top == emotion for top in tops]))
            row[f"top_minilm_{emotion}"] = float(np.mean([top == emotion for top in tops_minilm]))
            row[f"minilm_{emotion}"] = float(np.mean([prototypes[i][emotion] for i in items]))
        if variant.target:
            row["target"] = float(np.mean([np.mean([scores[i][e] for e in variant.target]) for i in items]))
            row["hit_nade"] = float(np.mean([top in variant.target for top in tops]))
            row["hit_minilm"] = float(np.mean([top in variant.target for top in tops_minilm]))
            # per answer: a hit that also stays coherent (no loop, on topic): fair to prompting, whose answers loop
            row["coherent_hit_nade"] = float(np.mean([t in variant.target and ok[i] for t, i in zip(tops, items)]))
            row["coherent_hit_minilm"] = float(np.mean([t in variant.target and ok[i]
                                                        for t, i in zip(tops_minilm, items)]))
            # for mixes: does each component show (is it among NADE's top two)?
            row["each_shows"] = {e: float(np.mean([e in sorted(EMOTIONS, key=scores[i].get)[-2:] for i in items]))
                                 for e in variant.target}
        if base:
            row["sim"] = float(np.mean([answer_vecs[i] @ answer_vecs[b] for i, b in zip(items, base)]))
        targets = [c for c in variant.target if c in concept_scores]
        if targets and base:
            score = lambda i: np.mean([concept_scores[c][i] for c in targets])  # noqa: E731
            lift = [score(i) - score(b) for i, b in zip(items, base)]
            row["concept_score"] = float(np.mean([score(i) for i in items]))
            row["concept_lift"], row["concept_moved"] = float(np.mean(lift)), float(np.mean([d > 0 for d in lift]))
        row["topic"] = float(np.mean([topic[i] for i in items]))
        row["ppl"] = float(np.nanmedian([ppl[i] for i in items]))
        row["distinct2"] = float(np.mean([distinct2(texts[i]) for i in items]))
        row["examples"] = [texts[i] for i in items[:2]]
        result.rows.append(row)
        result.answers[variant.label] = [{"question": index[i][1], "text": texts[i], "nade": scores[i],
                                          "minilm": prototypes[i], "coherent": ok[i]} for i in items]
    return result


def concept_matrix(answer_vecs: np.ndarray, prototypes: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Per concept, each answer's mean cosine to the concept's prototype sentences (the MiniLM scorer's rule)."""
    return {c: answer_vecs @ embed(list(sentences)).mean(0) for c, sentences in prototypes.items()}


def concept_markdown(result: EvalResult) -> str:
    lines = ["| variant | moved toward the concept | score lift | concept score | sim. to unsteered | on topic | "
             "perplexity | distinct-2 |", "|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in ("concept_moved", "concept_lift", "concept_score", "sim")]
        lines.append(f"| {r['label']} | {' | '.join(cells)} | {r['topic']:.3f} | {r['ppl']:.1f} | "
                     f"{r['distinct2']:.3f} |")
    return "\n".join(lines)


def coherent(row, base_ppl: float, min_distinct2: float = THRESHOLDS["distinct2"]) -> bool:
    return (row["distinct2"] >= min_distinct2 and row["topic"] >= THRESHOLDS["topic"]
            and row["ppl"] <= THRESHOLDS["ppl_ratio"] * base_ppl)


def agreed_hit(row) -> float:
    """The hit rate both scorers agree on: the lower of the two."""
    return min(row["hit_nade"], row["hit_minilm"])


def recommend(result: EvalResult, emotions) -> dict[str, dict | None]:
    """Per emotion, among the coherent sweep rows (distinct-2 >= CALIBRATION_DISTINCT2): the best hit rate both
    scorers agree on (then the best mean of the two, then the smaller value). {"value": dose or alpha, "band": [first, last] or None}, or None."""
    base_ppl = next((r["ppl"] for r in result.rows if r["label"] == "unsteered"), float("inf"))
    best = {}
    for emotion in emotions:
        rows = [r for r in result.rows if r["emotions"] == [emotion] and r["alpha"] > 0 and r["group"] == "sweep"]
        good = [r for r in rows if coherent(r, base_ppl, CALIBRATION_DISTINCT2)]
        pick = max(good, key=lambda r: (agreed_hit(r), r["hit_nade"] + r["hit_minilm"], -r["alpha"]), default=None)
        best[emotion] = {"value": pick["alpha"], "band": pick["band"]} if pick else None
    return best


def markdown(result: EvalResult) -> str:
    lines = ["| variant | hit NADE | hit MiniLM | coherent hits NADE / MiniLM | NADE target score | "
             "sim. to unsteered | on topic | perplexity | distinct-2 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("hit_nade", "hit_minilm", "coherent_hit_nade",
                                                             "coherent_hit_minilm")]
        target = f"{r['target']:.3f}" if "target" in r else "-"
        sim = f"{r['sim']:.3f}" if "sim" in r else "-"
        lines.append(f"| {r['label']} | {cells[0]} | {cells[1]} | {cells[2]} / {cells[3]} | {target} | {sim} | "
                     f"{r['topic']:.3f} | {r['ppl']:.1f} | {r['distinct2']:.3f} |")
    return "\n".join(lines)


def plot(result: EvalResult, emotions, out) -> None:
    """The trade-off: the hit rate both scorers agree on against repetition and against staying on topic, for
    every swept row (small dots), the calibrated intensities (large dots) and prompting (stars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colors = dict(zip(emotions, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (key, title, gate) in zip(axes, [("distinct2", "distinct-2 (1 = no repeated bigram)", "distinct2"),
                                             ("topic", "on topic (cosine to the question)", "topic")]):
        for emotion in emotions:
            for group, marker, size in (("sweep", "o", 14), ("calibrated", "o", 90), ("prompt", "*", 160)):
                rows = [r for r in result.rows if r["emotions"] == [emotion] and r["group"] == group]
                ax.scatter([r[key] for r in rows], [agreed_hit(r) for r in rows], s=size, marker=marker,
                           color=colors[emotion], alpha=0.9 if size > 14 else 0.35,
                           label=emotion if group == "calibrated" or (group == "sweep" and not any(
                               r["group"] == "calibrated" for r in result.rows)) else None)
        ax.axvline(THRESHOLDS[gate], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(title)
        ax.set_ylabel("hit rate, both scorers agree (min of NADE, MiniLM)")
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_title("large dots: calibrated intensity 1.0; stars: prompting; small: sweep")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


MIXES = (("joy", "sadness"), ("anger", "fear"), ("disgust", "joy"), ("joy", "fear"))


def extra_variants(emotions, intensity: float = 1.0) -> list[Variant]:
    """On the calibrated file: two-emotion mixes (the contributions add, each on its own band) and positions
    'all' (the prompt steered too) against the default 'response'."""
    from ..engine.spec import steer

    variants = []
    for a, b in [m for m in MIXES if set(m) <= set(emotions)]:
        spec = steer(**{a: intensity, b: intensity})
        variants.append(Variant(f"{a}+{b} {intensity:g}+{intensity:g}", spec, (a, b), intensity, "mix"))
    for emotion in emotions:
        spec = steer(positions="all", **{emotion: intensity})
        variants.append(Variant(f"{emotion} {intensity:g} positions=all", spec, (emotion,), intensity, "positions"))
    return variants
