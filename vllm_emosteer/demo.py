"""The steered demo: neutral questions answered unsteered, in each emotion and in one mix, all in one batch."""

from __future__ import annotations

import os
import textwrap

QUESTIONS = (
    "Tell me about your day.",
    "What do you think of the weather this week?",
    "Describe your morning commute.",
)


def variants(emotions: list[str], intensity: float) -> list[tuple[str, dict | None]]:
    from .engine.spec import steer

    rows: list[tuple[str, dict | None]] = [("unsteered", None)]
    rows += [(f"{e} {intensity:g}", steer(**{e: intensity})) for e in emotions]
    if len(emotions) >= 2:
        a, b = ("anger", "fear") if {"anger", "fear"} <= set(emotions) else emotions[:2]
        rows.append((f"{a}+{b} {intensity / 2:g}+{intensity / 2:g}", steer(**{a: intensity / 2, b: intensity / 2})))
    return rows


def run_demo(model: str | None, vectors: str | None, intensity: float, max_tokens: int, compile_: bool) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from .default_model import model_path
    from .engine.options import load_bank, vectors_path
    from .scores import emotion_scores, prototype_scores, top_emotion

    model = model or str(model_path())
    options = {"vectors": vectors} if vectors else {}
    emotions = load_bank(vectors_path(vectors)).emotions
    llm = LLM(model=model, max_model_len=1024, enforce_eager=not compile_, additional_config={"emosteer": options},
              seed=0)
    rows = variants(emotions, intensity)
    conversations, params, labels = [], [], []
    for question in QUESTIONS:
        for label, extra in rows:
            conversations.append([{"role": "user", "content": question}])
            params.append(SamplingParams(max_tokens=max_tokens, temperature=0, extra_args=extra))
            labels.append((question, label))
    try:
        outputs = llm.chat(conversations, params, use_tqdm=True)
    finally:
        llm.llm_engine.engine_core.shutdown()  # before exit: left to garbage collection, exit can abort
    texts = [o.outputs[0].text.strip() for o in outputs]
    scores, prototypes = emotion_scores(texts), prototype_scores(texts)
    print(f"\n{len(texts)} requests with {len(rows)} different steering settings ran in one batch.")
    print("Top emotion by two scorers: NADE (a learned emotion model) and MiniLM (cosine to emotion prototypes).\n")
    current = None
    for (question, label), text, score, prototype in zip(labels, texts, scores, prototypes):
        if question != current:
            print(f"=== {question}")
            current = question
        print(f"--- {label:<22} NADE: {top_emotion(score):<8} MiniLM: {top_emotion(prototype)}")
        print(textwrap.fill(text, width=100, initial_indent="    ", subsequent_indent="    "))
    print()
