"""Emotion scores of texts with NADE (offline: a fastText emoji model and one regressor per emotion)."""

from __future__ import annotations

from functools import lru_cache

from .extract import EMOTIONS


@lru_cache(maxsize=1)
def _nade():
    try:
        from nade import Nade
    except ImportError as exc:
        raise ImportError("emotion scores need NADE: pip install nade==0.3.1 (or vllm-emosteer[eval])") from exc
    return Nade()


def emotion_scores(texts: list[str]) -> list[dict[str, float]]:
    """Per text, NADE's 0-1 intensity of each of the five emotions."""
    if not texts:
        return []
    predicted = _nade().predict([t if t.strip() else "." for t in texts])
    return [{e: float(predicted[e][i]) for e in EMOTIONS} for i in range(len(texts))]
