"""The shared vocabulary: the five emotions, how each is described to a model, and how an answer in that emotion is
asked for (the extraction's emotional instruction and the evaluation's prompting baseline are the same words)."""

EMOTIONS = ("joy", "anger", "disgust", "fear", "sadness")
DESCRIPTIONS = {
    "joy": "extremely happy and joyful",
    "anger": "extremely angry and furious",
    "disgust": "extremely disgusted: everything seems gross, filthy and revolting to you",
    "fear": "extremely scared and afraid",
    "sadness": "extremely sad and heartbroken",
}
# the user turn that asks for an emotional answer; {description} is DESCRIPTIONS[emotion] (or describe(emotion))
EMOTIONAL_INSTRUCTION = "Answer as someone who is {description} right now. {question}"


def describe(emotion: str) -> str:
    """How an emotion (or any concept) is described to a model."""
    return DESCRIPTIONS.get(emotion, f"extremely {emotion}")
