"""Your own concepts: contrast pairs from a JSON Lines file (`vllm-emosteer extract --pairs FILE`).

Each line names a concept and gives one contrast pair, in one of two forms:

    {"concept": "formal", "question": "How do I boil an egg?",
     "positive": "Answer in a very formal register.", "negative": "Answer casually."}
    {"concept": "pirate", "positive_text": "Arr, matey, the sea be calm.", "negative_text": "The sea is calm."}

The first: the model answers the question under each instruction (a system prompt), and both answers are
teacher-forced after the plain question, as in the emotion contrast recipe. The second: the texts are the
answers (after `question`, if given, else on their own). A concept's vector is the mean of its positive answers'
activations minus the mean of its negative answers'; any number of concepts go into one vectors file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

CONCEPT = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
INSTRUCTED = ("question", "positive", "negative")
WRITTEN = ("positive_text", "negative_text")


class PairsError(ValueError):
    """A pairs file that cannot be used; the message names the line and the field."""


@dataclass(frozen=True)
class Pair:
    concept: str
    line: int
    question: str | None = None
    positive: str | None = None  # instructions (the model answers)
    negative: str | None = None
    positive_text: str | None = None  # ready answers
    negative_text: str | None = None


def load_pairs(path: str | Path) -> list[Pair]:
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"pairs file not found: {path}")
    pairs, spelled = [], {}
    seen = set()
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PairsError(f"{where}: not a JSON object ({exc.msg})") from None
        if not isinstance(item, dict):
            raise PairsError(f"{where}: not a JSON object")
        unknown = sorted(set(item) - {"concept", *INSTRUCTED, *WRITTEN})
        if unknown:
            raise PairsError(f"{where}: unknown field(s) {unknown}; known: concept, {', '.join(INSTRUCTED + WRITTEN)}")
        for key, value in item.items():
            if not isinstance(value, str) or not value.strip():
                raise PairsError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
        if "concept" not in item:
            raise PairsError(f"{where}: missing 'concept'")
        concept = item["concept"]
        if not CONCEPT.fullmatch(concept):
            raise PairsError(f"{where}: concept {concept!r} must be 1-64 lower-case letters, digits, '_', '.' or '-'")
        if spelled.setdefault(concept.replace("-", "_"), concept) != concept:
            raise PairsError(f"{where}: concept {concept!r} duplicates {spelled[concept.replace('-', '_')]!r}")
        written = any(key in item for key in WRITTEN)
        needed = WRITTEN if written else INSTRUCTED
        missing = [key for key in needed if key not in item]
        if missing:
            raise PairsError(f"{where}: missing '{missing[0]}' (give {', '.join(INSTRUCTED)}, or "
                             f"{', '.join(WRITTEN)} with an optional question)")
        if written and ("positive" in item or "negative" in item):
            raise PairsError(f"{where}: give instructions (positive, negative) or texts (positive_text, "
                             "negative_text), not both")
        key = json.dumps(item, sort_keys=True)
        if key in seen:
            raise PairsError(f"{where}: the same pair is given twice")
        seen.add(key)
        pairs.append(Pair(line=number, **item))
    if not pairs:
        raise PairsError(f"{path}: no pairs")
    return pairs


def concepts_of(pairs: list[Pair]) -> list[str]:
    return list(dict.fromkeys(p.concept for p in pairs))
