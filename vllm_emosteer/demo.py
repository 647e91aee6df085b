"""The steered demo: neutral questions answered unsteered, in each emotion and in one mix, all in one batch, sampled
as a chat would sample, each answer judged by both scorers; it ends with what the claims report found."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

QUESTIONS = (
    "Tell me about your day.",
    "What do you think of the weather this week?",
    "Describe your morning commute.",
)
# what a chat front-end would send; a fixed seed per request makes each answer reproducible in any batch
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "seed": 0}
GREEDY = {"temperature": 0.0}


def variants(emotions: list[str], intensity: float) -> list[tuple[str, tuple[str, ...], dict | None]]:
    """(label, the emotions it steers toward, extra_args)."""
    from .engine.spec import steer

    rows: list[tuple[str, tuple[str, ...], dict | None]] = [("unsteered", (), None)]
    rows += [(f"{e} {intensity:g}", (e,), steer(**{e: intensity})) for e in emotions]
    if len(emotions) >= 2:
        # the pair whose components both rose most often in the bundled vectors' claims report
        a, b = ("fear", "sadness") if {"fear", "sadness"} <= set(emotions) else emotions[:2]
        rows.append((f"{a}+{b} {intensity:g}+{intensity:g}", (a, b), steer(**{a: intensity, b: intensity})))
    return rows


def claims_summary_path(vectors: Path) -> Path:
    """Where `eval --claims --out DIR` results for a vectors file are kept beside it (DIR/claims-summary.json,
    copied there by hand: the bundled file's is shipped)."""
    return vectors.with_name(vectors.name.removesuffix(".safetensors") + ".claims.json")


def closing_line(vectors: Path, digest: str) -> str:
    """Which emotions the claims report found this model expressing under steering, if it was run on these vectors."""
    path = claims_summary_path(vectors)
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        summary = None
    if not summary or summary.get("digest") != digest:
        return f"No claims report for these vectors: `vllm-emosteer eval --claims --vectors {vectors}` measures them."
    groups = {w: [e for e, v in summary["expressed"].items() if v == w] for w in ("yes", "partly", "no")}
    said = [f"{', '.join(groups[w])} {text}" for w, text in (("yes", "expressed"), ("partly", "partly"),
                                                              ("no", "not")) if groups[w]]
    return (f"On this model at intensity 1 (eval --claims, {summary['date']}, coherent hits by both scorers): "
            + "; ".join(said) + ". The claims report: docs/claims.md.")


def run_demo(model: str | None, vectors: str | None, intensity: float, max_tokens: int, compile_: bool,
             greedy: bool = False, dtype: str = "auto") -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from .default_model import model_path
    from .engine.options import load_bank, vectors_path
    from .scores import emotion_scores, prototype_scores, top_emotion

    model = model or str(model_path())
    options = {"vectors": vectors} if vectors else {}
    path = vectors_path(vectors)
    bank = load_bank(path)
    llm = LLM(model=model, max_model_len=1024, enforce_eager=not compile_, additional_config={"emosteer": options},
              seed=0, dtype=dtype)
    sampling = GREEDY if greedy else SAMPLING
    rows = variants(bank.emotions, intensity)
    conversations, params, labels = [], [], []
    for question in QUESTIONS:
        for label, target, extra in rows:
            conversations.append([{"role": "user", "content": question}])
            params.append(SamplingParams(max_tokens=max_tokens, extra_args=extra, **sampling))
            labels.append((question, label, target))
    try:
        outputs = llm.chat(conversations, params, use_tqdm=True)
    finally:
        llm.llm_engine.engine_core.shutdown()  # before exit: left to garbage collection, exit can abort
    texts = [o.outputs[0].text.strip() for o in outputs]
    scores, prototypes = emotion_scores(texts), prototype_scores(texts)
    how = "greedy" if greedy else "sampled: " + ", ".join(f"{k} {v}" for k, v in SAMPLING.items()) + " per request"
    print(f"\n{len(texts)} requests with {len(rows)} different steering settings ran in one batch "
          f"({how}; {max_tokens} tokens).")
    print("Each answer's top emotion by two scorers, NADE (a learned emotion model) and MiniLM (cosine to emotion "
          "prototypes); + marks the emotion it was steered toward.\n")
    current = None
    for (question, label, target), text, score, prototype in zip(labels, texts, scores, prototypes):
        if question != current:
            print(f"=== {question}")
            current = question
        verdicts = [f"{name} {top}{' +' if top in target else ''}"
                    for name, top in (("NADE", top_emotion(score)), ("MiniLM", top_emotion(prototype)))]
        print(f"--- {label:<16} {verdicts[0]:<16} {verdicts[1]}")
        print(textwrap.fill(text, width=100, initial_indent="    ", subsequent_indent="    "))
    print()
    print(closing_line(path, bank.digest()))
