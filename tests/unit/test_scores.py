"""The two emotion scorers on the default model's own answers (tests/data/smollm2_answers.json): plain answers
to neutral questions, and answers where the emotion was asked for in the prompt."""

import json
from pathlib import Path

import numpy as np

from vllm_emosteer.scores import EMOTIONS, emotion_scores, prototype_scores, top_emotion

ANSWERS = json.loads((Path(__file__).parents[1] / "data" / "smollm2_answers.json").read_text())


def test_prototype_scorer_separates_emotional_from_neutral_answers():
    neutral = prototype_scores(ANSWERS["neutral"])
    for emotion in EMOTIONS:
        emotional = prototype_scores(ANSWERS[emotion])
        gap = np.mean([s[emotion] for s in emotional]) - np.mean([s[emotion] for s in neutral])
        assert gap > 0.1, f"{emotion}: emotional answers score only {gap:.3f} above neutral ones"
    shares = {e: np.mean([top_emotion(s) == e for s in prototype_scores(ANSWERS[e])]) for e in EMOTIONS}
    assert shares["joy"] >= 0.9 and shares["fear"] >= 0.8 and shares["anger"] >= 0.5, shares
    assert np.mean([top_emotion(s) == "joy" for s in neutral]) < 0.9  # plain answers are not all "joy"


def test_scorers_agree_where_both_can_see_the_emotion():
    texts = ANSWERS["joy"] + ANSWERS["sadness"]
    agree = [top_emotion(a) == top_emotion(b) for a, b in zip(emotion_scores(texts), prototype_scores(texts))]
    assert np.mean(agree) >= 0.75
    anger = ANSWERS["anger"]  # NADE rarely ranks anger first; the prototypes do
    assert (np.mean([top_emotion(s) == "anger" for s in prototype_scores(anger)])
            > np.mean([top_emotion(s) == "anger" for s in emotion_scores(anger)]))
