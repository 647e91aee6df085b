"""The claims report as markdown and as one figure (four panels), from `claims.analyse`'s dict plus the eval rows."""

from __future__ import annotations

from .claims import DOSES, MIX_DOSES, SUPPRESSION

CLAIMS = {"continuous": "Continuous control (the emotion rises with the intensity)",
          "suppression": "Suppression (-1 removes the emotion: the paper, ~90%)",
          "additivity": "Additivity (each component of a mix shows)",
          "consistency": "Global consistency (the emotion holds over a whole answer)"}


def _f(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _hit(row, scorer, intervals) -> str:
    low, high = intervals[row["label"]][scorer]
    return f"{row[f'hit_{scorer}']:.2f} [{low:.2f}-{high:.2f}]"


def _fidelity(row) -> str:
    return f"{_f(row.get('sim'), 3)} | {row['topic']:.3f} | {row['ppl']:.1f} | {row['distinct2']:.3f}"


def markdown(report: dict) -> str:
    rows = {r["label"]: r for r in report["rows"]}
    intervals, emotions = report["intervals"], list(report["dose_response"])
    s = report["sizes"]
    out = [f"Vectors: `{report['vectors']}` (digest {report['digest']}); model: `{report['model']}`. Greedy decoding, "
           f"one batch. {s['questions']} neutral questions (held out from calibration) for the dose-response and "
           f"the mixes, {s['queries']} EmotionQuery questions per emotion for suppression, {s['whole']} questions "
           f"for the {s['whole_tokens']}-token answers, {s['max_tokens']} tokens otherwise. Hit rates come with a 95% "
           "interval (Wilson). Fidelity and fluency: sim. = cosine to the unsteered answer, on topic = cosine to the "
           "question, ppl = perplexity under the unsteered model, d-2 = distinct-2.", ""]
    if report.get("note"):
        out += [f"**Note:** {report['note']}", ""]
    out += ["## Verdicts", "", "| claim | verdict | the number |", "|---|---|---|"]
    out += [f"| {CLAIMS[k]} | **{v['verdict']}** | {v['number']} |" for k, v in report["verdicts"].items()]
    out += ["", "Emotions this model expresses at intensity 1 (coherent hits, both scorers): " + ", ".join(
        f"{e} {w}" for e, w in report["expressed"].items()), ""]

    out += ["## 1. Dose-response (neutral questions)", "",
            "| variant | hit NADE | hit MiniLM | NADE score | MiniLM score | coherent | sim. | on topic | ppl | d-2 |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for e in emotions:
        d = report["dose_response"][e]
        labels = ["unsteered"] + [f"{e} {x:g}" for x in DOSES] + [f"prompted {e}"]
        for label, ok in zip(labels, d["coherent"] + [None]):
            r = rows[label]
            hits = (f"{_hit(r, 'nade', intervals)} | {_hit(r, 'minilm', intervals)}" if "hit_nade" in r else
                    f"{r[f'top_{e}']:.2f} | {r[f'top_minilm_{e}']:.2f}")
            coherent = "-" if ok is None else "yes" if ok else "**no**"
            name = f"{e}: unsteered" if label == "unsteered" else label
            out.append(f"| {name} | {hits} | {r[f'score_{e}']:.3f} | {r[f'minilm_{e}']:.3f} | {coherent} | "
                       f"{_fidelity(r)} |")
    out += ["", "| emotion | Spearman rho NADE / MiniLM (coherent range) | all levels | stops rising at | "
            "coherence breaks at |", "|---|---|---|---|---|"]
    for e in emotions:
        d = report["dose_response"][e]
        breaks = "never (up to 3)" if d["coherence_breaks_at"] is None else f"{d['coherence_breaks_at']:g}"
        out.append(f"| {e} | {_f(d['rho_nade'])} / {_f(d['rho_minilm'])} | {_f(d['rho_nade_all'])} / "
                   f"{_f(d['rho_minilm_all'])} | {d['stops_rising_at']:g} | {breaks} |")

    out += ["", "## 2. Suppression (EmotionQuery questions of the same emotion)", "",
            "| emotion | variant | NADE score | cut | hit NADE | hit MiniLM | other emotions (NADE score) | sim. | "
            "on topic | ppl | d-2 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in emotions:
        d = report["suppression"][e]
        u = d["unsteered"]
        others = lambda o: ", ".join(f"{k} {v:.2f}" for k, v in o.items())  # noqa: E731
        out.append(f"| {e} | unsteered | {u['score_nade']:.3f} | - | {u['hit_nade']:.2f} | {u['hit_minilm']:.2f} | "
                   f"{others(u['others_nade'])} | {_fidelity(rows[f'{e} queries unsteered'])} |")
        for label, level in d["levels"].items():
            drop = "-" if level["drop_nade"] is None else f"{100 * level['drop_nade']:.0f}%"
            flag = "" if level["coherent"] else " (incoherent)"
            out.append(f"| {e} | {label}{flag} | {level['score_nade']:.3f} | {drop} | {level['hit_nade']:.2f} | "
                       f"{level['hit_minilm']:.2f} | {others(level['others_nade'])} | "
                       f"{_fidelity(rows[f'{e} queries {label}'])} |")

    out += ["", "## 3. Mixes: share of answers where both components score above the unsteered answer", ""]
    high, low = (f"{x:g}+{x:g}" for x in MIX_DOSES)
    for scorer in ("nade", "minilm"):
        out += [f"{scorer.upper() if scorer == 'nade' else 'MiniLM'}: above the diagonal {high}, below it {low}.", "",
                "| | " + " | ".join(emotions) + " |", "|---" * (len(emotions) + 1) + "|"]
        for i, a in enumerate(emotions):
            cells = []
            for j, b in enumerate(emotions):
                if i == j:
                    cells.append("-")
                else:
                    key = f"{a}+{b}" if i < j else f"{b}+{a}"
                    cells.append(f"{report['mixes'][high if i < j else low][key][scorer]:.2f}")
            out.append(f"| **{a}** | " + " | ".join(cells) + " |")
        out.append("")
    out += ["Prompting both emotions (NADE / MiniLM): " + ", ".join(
        f"{p} {s['nade']:.2f}/{s['minilm']:.2f}" for p, s in report["mixes"]["prompted"].items()), "",
        "Fidelity of the mixes at " + high + ": " + ", ".join(
            f"{p} sim. {_f(rows[f'{p} {high}'].get('sim'))} d-2 {rows[f'{p} {high}']['distinct2']:.2f}"
            for p in report["mixes"][high]), ""]

    out += [f"## 4. Whole answers ({s['whole_tokens']} tokens): hit rate of each third", "",
            "| emotion | variant | thirds NADE | thirds MiniLM | d-2 (whole) | on topic | ppl |",
            "|---|---|---|---|---|---|---|"]
    for e in emotions:
        for kind in ("unsteered", "steered", "prompted"):
            w = report["whole_answers"][e][kind]
            name = {"steered": "intensity 1", "prompted": "prompted", "unsteered": "unsteered"}[kind]
            out.append(f"| {e} | {name} | {' / '.join(f'{h:.2f}' for h in w['thirds_nade'])} | "
                       f"{' / '.join(f'{h:.2f}' for h in w['thirds_minilm'])} | {w['distinct2']:.3f} | "
                       f"{w['topic']:.3f} | {w['ppl']:.1f} |")
    return "\n".join(out) + "\n"


def plot(report: dict, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    emotions = list(report["dose_response"])
    colors = dict(zip(emotions, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    ax = axes[0, 0]
    for e in emotions:
        d = report["dose_response"][e]
        ax.plot(d["levels"], d["hit_agreed"], "o-", color=colors[e], label=e)
        bad = [x for x, ok in zip(d["levels"], d["coherent"]) if not ok]
        ax.plot(bad, [h for x, h in zip(d["levels"], d["hit_agreed"]) if x in bad], "x", color="black", ms=9)
    ax.set(title="1. dose-response (x: answers no longer coherent)", xlabel="intensity",
           ylabel="hit rate, both scorers agree", ylim=(-0.03, 1.03))
    ax.legend()
    ax = axes[0, 1]
    labels = ["unsteered"] + [f"{x:g}" for x in SUPPRESSION] + ["calm prompt"]
    width = 0.8 / len(labels)
    for k, label in enumerate(labels):
        values = [report["suppression"][e]["unsteered" if label == "unsteered" else "levels"] for e in emotions]
        values = [v["score_nade"] if label == "unsteered" else v[label]["score_nade"] for v in values]
        ax.bar([i + k * width for i in range(len(emotions))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(emotions))], emotions)
    ax.set(title="2. suppression on emotional questions", ylabel="NADE score of the emotion")
    ax.legend()
    ax = axes[1, 0]
    high, low = (f"{x:g}+{x:g}" for x in MIX_DOSES)
    grid = [[float("nan")] * len(emotions) for _ in emotions]
    for i, a in enumerate(emotions):
        for j, b in enumerate(emotions):
            if i != j:
                key = f"{a}+{b}" if i < j else f"{b}+{a}"
                grid[i][j] = min(report["mixes"][high if i < j else low][key].values())
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for i in range(len(emotions)):
        for j in range(len(emotions)):
            if i != j:
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", color="white")
    ax.set_xticks(range(len(emotions)), emotions)
    ax.set_yticks(range(len(emotions)), emotions)
    ax.set_title(f"3. mixes: both components rise\n(lower of NADE, MiniLM; above the diagonal {high}, below {low})")
    fig.colorbar(image, ax=ax)
    ax = axes[1, 1]
    for e in emotions:
        w = report["whole_answers"][e]
        ax.plot([1, 2, 3], w["steered"]["thirds_agreed"], "o-", color=colors[e], label=f"{e} 1")
        ax.plot([1, 2, 3], w["prompted"]["thirds_agreed"], "*--", color=colors[e], alpha=0.6)
    ax.set_xticks([1, 2, 3], ["first third", "second", "last"])
    ax.set(title="4. whole answers (dashed: prompted)", ylabel="hit rate, both scorers agree", ylim=(-0.03, 1.03))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
