"""The seed paper's four claims (Dong et al., arXiv 2502.04075), measured through the engine: `eval --claims`.

1. Continuous control: the emotion rises with the intensity (dose-response on neutral questions).
2. Suppression: a negative intensity removes the emotion (on EmotionQuery's emotional questions; the paper: -1
   cuts the emotion's score by almost 90%).
3. Additivity: in a two-emotion mix each component shows (every pair at 1 + 1 and 0.5 + 0.5).
4. Global consistency: the emotion holds over a whole 256-token answer (each third scored on its own).
Every variant runs in one batch on one engine (greedy), beside prompting: the emotion asked for in the user turn,
or "answer calmly" for suppression. Held out: the neutral questions are the ones calibration never sees (the
neutral prompts after the first CALIBRATION_PROMPTS), the suppression questions EmotionQuery's last QUERIES per emotion,
which the contrast and pairs recipes never read (the paper recipe samples EmotionQuery: the report says so).
The analysis (`analyse`) works on an EvalResult alone, so it is tested on fixed score tables.
"""

from __future__ import annotations

import json
import math
from importlib import resources

import numpy as np

from ..emotions import EMOTIONAL_INSTRUCTION, EMOTIONS, describe
from ..scores import emotion_scores, prototype_scores, top_emotion
from .evaluate import CALIBRATION_PROMPTS, EvalResult, Variant, agreed_hit, coherent, neutral_prompts

DOSES = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
SUPPRESSION = (-0.5, -1.0, -2.0)
MIX_DOSES = (1.0, 0.5)
WHOLE_TOKENS = 256
CALM = "Answer calmly, without emotion. {question}"
QUERIES = 20  # EmotionQuery questions per emotion for suppression
WHOLE_PROMPTS = 16
# verdict thresholds: Spearman rho for "monotone"; the paper's ~90% cut read as ">= 80%"; a mix's components
# both rising in at least half the answers (chance, for noise that moves each score either way: a quarter); the
# last third of a whole answer keeping at least 80% of the first third's hit rate, and the whole answer at least
# 80% of the unsteered answers' distinct-2 (long greedy answers of a small model repeat themselves unsteered too)
MONOTONE_RHO, SUPPRESSION_DROP, MIX_SHARE, THIRDS_KEPT, FLUENCY_KEPT = 0.8, 0.8, 0.5, 0.8, 0.8
# "expressed": coherent hits in at least half the answers by both scorers; "partly": by one scorer, above the
# chance of one emotion in five
EXPRESSED, PARTLY = 0.5, 0.2


def claims_questions(prompts: int | None = None) -> list[str]:
    """The neutral questions of the claims: those calibration never reads."""
    return neutral_prompts()[CALIBRATION_PROMPTS:][:prompts]


def emotional_queries(emotion: str, count: int = QUERIES) -> list[str]:
    """EmotionQuery's last `count` distinct questions of an emotion (what a user in that mood would ask; the set
    repeats some questions, joy's 31 times)."""
    text = resources.files("vllm_emosteer").joinpath("data/EmotionQuery.json").read_text()
    distinct = list(dict.fromkeys(reversed(json.loads(text)[emotion])))
    return distinct[:count][::-1]


def prompted(emotions) -> str:
    return EMOTIONAL_INSTRUCTION.replace("{description}", " and ".join(describe(e) for e in emotions))


def claim_variants(emotions, questions, queries: dict[str, list[str]], whole: list[str]) -> list[Variant]:
    """Everything the four claims need, for one batch on the file's calibrated intensities."""
    from ..engine.spec import steer

    mix = lambda a, b, x: Variant(f"{a}+{b} {x:g}+{x:g}", steer(**{a: x, b: x}), (a, b), x, "mix")  # noqa: E731
    variants = [Variant("unsteered", None)]
    for e in emotions:
        variants.append(Variant(f"prompted {e}", None, (e,), 0.0, "prompt", template=prompted([e])))
        variants += [Variant(f"{e} {x:g}", steer(**{e: x}), (e,), x, "dose") for x in DOSES]
        q, ref = tuple(queries[e]), f"{e} queries unsteered"
        variants.append(Variant(ref, None, (e,), 0.0, "suppress", prompts=q, reference=ref))
        variants += [Variant(f"{e} queries {x:g}", steer(**{e: x}), (e,), x, "suppress", prompts=q, reference=ref)
                     for x in SUPPRESSION]
        variants.append(Variant(f"{e} queries calm prompt", None, (e,), 0.0, "suppress", template=CALM, prompts=q,
                                reference=ref))
    pairs = [(a, b) for i, a in enumerate(emotions) for b in emotions[i + 1:]]
    variants += [mix(a, b, x) for x in MIX_DOSES for a, b in pairs]
    variants += [Variant(f"prompted {a}+{b}", None, (a, b), 0.0, "prompt mix", template=prompted([a, b]))
                 for a, b in pairs]
    long = dict(prompts=tuple(whole), max_tokens=WHOLE_TOKENS, reference="whole unsteered")
    variants.append(Variant("whole unsteered", None, group="whole", **long))
    for e in emotions:
        variants.append(Variant(f"whole {e} 1", steer(**{e: 1.0}), (e,), 1.0, "whole", **long))
        variants.append(Variant(f"whole prompted {e}", None, (e,), 0.0, "whole", template=prompted([e]), **long))
    return variants


# -- statistics -------------------------------------------------------------------------------------------------

def wilson(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a hit rate measured on n answers (Wilson score interval)."""
    if n == 0:
        return (0.0, 1.0)
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def spearman(xs, ys) -> float | None:
    """Spearman's rho (average ranks for ties); None for fewer than 3 points or a constant series."""
    if len(xs) < 3:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return np.array(out)

    rx, ry = ranks(list(xs)), ranks(list(ys))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def stops_rising(levels, values, tolerance: float = 0.02):
    """The smallest level whose value is within `tolerance` of the curve's maximum: where the curve stops rising."""
    top = max(values)
    return next(x for x, v in zip(levels, values) if v >= top - tolerance)


def relative_drop(before: float, after: float) -> float | None:
    return None if before <= 0 else (before - after) / before


def _interval(row) -> dict:
    n = row["answers"]
    return {"nade": wilson(row["hit_nade"], n), "minilm": wilson(row["hit_minilm"], n)}


# -- the four analyses --------------------------------------------------------------------------------------------

def dose_response(result: EvalResult, emotions) -> dict:
    base = result.row("unsteered")
    out = {}
    for e in emotions:
        rows = [result.row(f"{e} {x:g}") for x in DOSES]
        asked = result.row(f"prompted {e}")
        levels = [0.0, *DOSES]
        nade = [base[f"score_{e}"]] + [r[f"score_{e}"] for r in rows]
        minilm = [base[f"minilm_{e}"]] + [r[f"minilm_{e}"] for r in rows]
        hits = [min(base[f"top_{e}"], base[f"top_minilm_{e}"])] + [agreed_hit(r) for r in rows]
        ok = [coherent(r, base["ppl"]) for r in rows]
        breaks = next((x for x, good in zip(DOSES, ok) if not good), None)
        kept = 1 + (DOSES.index(breaks) if breaks is not None else len(DOSES))  # levels up to the last coherent one
        out[e] = {"levels": levels, "score_nade": nade, "score_minilm": minilm, "hit_agreed": hits,
                  "hit_nade": [base[f"top_{e}"]] + [r["hit_nade"] for r in rows],
                  "hit_minilm": [base[f"top_minilm_{e}"]] + [r["hit_minilm"] for r in rows],
                  "coherent": [True] + ok, "coherence_breaks_at": breaks,
                  "rho_nade": spearman(levels[:kept], nade[:kept]),
                  "rho_minilm": spearman(levels[:kept], minilm[:kept]),
                  "rho_nade_all": spearman(levels, nade), "rho_minilm_all": spearman(levels, minilm),
                  "stops_rising_at": stops_rising(levels[:kept], hits[:kept]),
                  "prompted": {"hit_agreed": agreed_hit(asked),
                               "coherent_hit": min(asked["coherent_hit_nade"], asked["coherent_hit_minilm"])}}
    return out


def suppression(result: EvalResult, emotions) -> dict:
    out = {}
    for e in emotions:
        base = result.row(f"{e} queries unsteered")
        levels = {}
        for label in [f"{x:g}" for x in SUPPRESSION] + ["calm prompt"]:
            row = result.row(f"{e} queries {label}")
            levels[label] = {"score_nade": row[f"score_{e}"], "hit_nade": row[f"top_{e}"],
                             "hit_minilm": row[f"top_minilm_{e}"],
                             "drop_nade": relative_drop(base[f"score_{e}"], row[f"score_{e}"]),
                             "others_nade": {o: row[f"score_{o}"] for o in EMOTIONS if o != e},
                             "coherent": coherent(row, base["ppl"])}
        out[e] = {"unsteered": {"score_nade": base[f"score_{e}"], "hit_nade": base[f"top_{e}"],
                                "hit_minilm": base[f"top_minilm_{e}"],
                                "others_nade": {o: base[f"score_{o}"] for o in EMOTIONS if o != e}},
                  "levels": levels, "questions": base["answers"]}
    return out


def both_rise(answers: list[dict], base: list[dict], components, scorer: str) -> float:
    """Share of answers in which every component scores above the unsteered answer to the same question."""
    reference = {a["question"]: a for a in base}
    return float(np.mean([all(a[scorer][c] > reference[a["question"]][scorer][c] for c in components)
                          for a in answers]))


def mixes(result: EvalResult, emotions) -> dict:
    base = result.answers["unsteered"]
    pairs = [(a, b) for i, a in enumerate(emotions) for b in emotions[i + 1:]]
    names = {f"{x:g}+{x:g}": (lambda a, b, x=x: f"{a}+{b} {x:g}+{x:g}") for x in MIX_DOSES}
    names["prompted"] = lambda a, b: f"prompted {a}+{b}"
    return {label: {f"{a}+{b}": {s: both_rise(result.answers[name(a, b)], base, (a, b), s) for s in ("nade", "minilm")}
                    for a, b in pairs}
            for label, name in names.items()}


def thirds(text: str) -> list[str]:
    words = text.split()
    cut = [round(len(words) * k / 3) for k in range(4)]
    return [" ".join(words[cut[k]:cut[k + 1]]) for k in range(3)]


def whole_answers(result: EvalResult, emotions) -> dict:
    """Hit rates of each third of the 256-token answers, scored separately (one scorer call for all thirds)."""
    labels = ["whole unsteered"] + [f"whole {e} 1" for e in emotions] + [f"whole prompted {e}" for e in emotions]
    parts = [t for label in labels for a in result.answers[label] for t in thirds(a["text"])]
    nade, minilm = emotion_scores(parts), prototype_scores(parts)
    tops = iter(zip([top_emotion(s) for s in nade], [top_emotion(s) for s in minilm]))
    hits = {}
    for label in labels:
        per = [[next(tops) for _ in range(3)] for _ in result.answers[label]]  # [answer][third] = (nade, minilm)
        hits[label] = per
    out = {}
    for e in emotions:
        entry = {}
        for kind, label in (("steered", f"whole {e} 1"), ("prompted", f"whole prompted {e}"),
                            ("unsteered", "whole unsteered")):
            per, row = hits[label], result.row(label)
            entry[kind] = {
                "thirds_nade": [float(np.mean([p[k][0] == e for p in per])) for k in range(3)],
                "thirds_minilm": [float(np.mean([p[k][1] == e for p in per])) for k in range(3)],
                "distinct2": row["distinct2"], "topic": row["topic"], "ppl": row["ppl"]}
            entry[kind]["thirds_agreed"] = [min(n, m) for n, m in zip(entry[kind]["thirds_nade"],
                                                                     entry[kind]["thirds_minilm"])]
        entry["answers"] = len(result.answers[f"whole {e} 1"])
        out[e] = entry
    return out


# -- verdicts ---------------------------------------------------------------------------------------------------

def _verdict(holding: list[str], emotions, number: str) -> dict:
    if holding and len(holding) == len(emotions):
        word = "holds"
    elif holding:
        word = f"holds for some ({', '.join(holding)})"
    else:
        word = "does not hold"
    return {"verdict": word, "holds_for": holding, "number": number}


def verdicts(report: dict, emotions) -> dict:
    dose, supp, mix, whole = (report[k] for k in ("dose_response", "suppression", "mixes", "whole_answers"))
    monotone = [e for e in emotions if (dose[e]["rho_nade"] or 0) >= MONOTONE_RHO
                and (dose[e]["rho_minilm"] or 0) >= MONOTONE_RHO]
    rho = ", ".join(f"{e} {_num(dose[e]['rho_nade'])}/{_num(dose[e]['rho_minilm'])}" for e in emotions)
    drops = {e: supp[e]["levels"]["-1"]["drop_nade"] for e in emotions}
    cut = [e for e in emotions if (drops[e] or 0) >= SUPPRESSION_DROP]
    pairs = mix["1+1"]
    additive = [p for p, s in pairs.items() if min(s.values()) >= MIX_SHARE]
    shows, kept, fluent = [], [], []
    for e in emotions:
        s, u = whole[e]["steered"], whole[e]["unsteered"]
        first, last = s["thirds_agreed"][0], s["thirds_agreed"][2]
        if first > u["thirds_agreed"][0]:
            shows.append(e)
            fluent += [e] if s["distinct2"] >= FLUENCY_KEPT * u["distinct2"] else []
            kept += [e] if last >= THIRDS_KEPT * first and e in fluent else []
    base_d2 = whole[emotions[0]]["unsteered"]["distinct2"]
    return {
        "continuous": _verdict(monotone, emotions, f"Spearman rho NADE/MiniLM up to where coherence breaks: {rho}"),
        "suppression": _verdict(cut, emotions, "NADE score cut by -1 on emotional questions: " + ", ".join(
            f"{e} {_pct(drops[e])}" for e in emotions) + " (paper: ~90%)"),
        "additivity": {**_verdict(additive, list(pairs), "pairs at 1+1 where both components rise (NADE/MiniLM): "
                                  + ", ".join(f"{p} {s['nade']:.2f}/{s['minilm']:.2f}" for p, s in pairs.items())),
                       "pairs": len(pairs)},
        "consistency": {**_verdict(kept, emotions, "hit rate (both scorers) by third of a 256-token answer at 1: "
                                + ", ".join(f"{e} " + "/".join(f"{h:.2f}" for h in whole[e]["steered"]["thirds_agreed"])
                                            for e in emotions)
                                + f"; distinct-2 of the whole answer (unsteered {base_d2:.2f}): " + ", ".join(
                                    f"{e} {whole[e]['steered']['distinct2']:.2f}" for e in emotions)),
                        "shows_in_first_third": shows, "fluency_kept": fluent},
    }


def expressed(result: EvalResult, emotions) -> dict[str, str]:
    """Per emotion at intensity 1: 'yes', 'partly' or 'no' (EXPRESSED, PARTLY)."""
    out = {}
    for e in emotions:
        row = result.row(f"{e} 1")
        low, high = sorted((row["coherent_hit_nade"], row["coherent_hit_minilm"]))
        out[e] = "yes" if low >= EXPRESSED else "partly" if high >= PARTLY else "no"
    return out


def analyse(result: EvalResult, emotions) -> dict:
    report = {"dose_response": dose_response(result, emotions), "suppression": suppression(result, emotions),
              "mixes": mixes(result, emotions), "whole_answers": whole_answers(result, emotions),
              "expressed": expressed(result, emotions),
              "intervals": {r["label"]: _interval(r) for r in result.rows if "hit_nade" in r}}
    report["verdicts"] = verdicts(report, emotions)
    return report


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"
