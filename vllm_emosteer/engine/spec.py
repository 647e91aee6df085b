"""Per-request steering specs: parse either request form, validate, fingerprint.

Two request forms are accepted, both inside `SamplingParams.extra_args`:

* nested (Python engine): ``{"emosteer": {"emotions": {"joy": 2.0}, "positions": "response",
  "layers": [20, 29]}}``
* flat (OpenAI ``vllm_xargs``, which allows no nested objects): ``{"emotion": "joy", "intensity": 2.0}``
  or ``{"emotions": ["joy", "fear"], "intensities": [2.0, 0.5]}``, plus ``steer_positions`` and
  ``steer_layers`` (``[first, last]``).

An engine may serve several named vector sets (the first is the default). A request picks one with ``"set"``
(flat: ``steer_set``) or names rows of any set as ``"set/name"``. Names of the default set stay plain ("joy");
rows of other sets are "set/name" in the parsed spec.

Intensities are multiplied by the bank's per-emotion calibrated scale (1.0 for uncalibrated banks) to give
the alpha added at every steered layer; ``"raw": true`` (flat: ``steer_raw``) uses them as alphas directly.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from vllm.exceptions import VLLMValidationError

POSITION_MODES = ("response", "all")
FLAT_KEYS = ("emotion", "intensity", "emotions", "intensities", "steer_positions", "steer_layers", "steer_raw",
             "steer_set")
NESTED_KEYS = ("emotions", "positions", "layers", "raw", "set")
FLAT_NAMES = {"positions": "steer_positions", "layers": "steer_layers", "raw": "steer_raw", "set": "steer_set"}
FLAT_BOOLS = {1: True, 0: False, "true": True, "false": False}  # what steer_raw may be in the flat form


class SteeringError(VLLMValidationError, ValueError):
    """Invalid steering input. A ValueError for `LLM.generate`, an HTTP 400 for `vllm serve`."""

    def __init__(self, message: str, parameter: str, value=None):
        super().__init__(f"emosteer: {message}", parameter=parameter, value=value)


@dataclass(frozen=True)
class SetLimits:
    """What one vector set accepts."""

    emotions: tuple[str, ...]
    max_dose: float | None = None  # None: the vectors file records no typical norms, so doses are unknown
    doses: tuple[tuple[str, float, float], ...] = ()  # (emotion, max dose per intensity, per raw alpha)
    hooked: tuple[int, ...] = ()  # the model layers where this set steers (empty: not known, not checked)


@dataclass(frozen=True)
class SteeringLimits:
    """What a running engine accepts; built from its vector sets and its emosteer options."""

    sets: dict[str, SetLimits]  # by set name; the first is the default set
    num_layers: int
    max_intensity: float
    max_emotions: int
    busy: frozenset[str] = frozenset()  # sets being loaded, replaced or unloaded: requests must wait

    @property
    def default_set(self) -> str:
        return next(iter(self.sets))

    @property
    def emotions(self) -> tuple[str, ...]:
        return self.sets[self.default_set].emotions


def split_name(name: str, default_set: str) -> tuple[str, str]:
    """(set, emotion) of a parsed spec's name: "joy" is in the default set, "style/formal" in "style"."""
    owner, slash, emotion = name.rpartition("/")
    return (owner if slash else default_set), emotion


@dataclass(frozen=True)
class SteeringSpec:
    intensities: tuple[tuple[str, float], ...]  # sorted by emotion name, zeros dropped
    positions: str = "response"
    layers: tuple[int, int] | None = None  # inclusive range of bank layer rows
    raw: bool = False

    def set_names(self, default_set: str) -> set[str]:
        return {split_name(name, default_set)[0] for name, _ in self.intensities}

    def fingerprint(self) -> str:
        canonical = json.dumps(
            [self.intensities, self.positions, self.layers, self.raw], separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def first_steered_position(positions: str, num_prompt_tokens: int) -> int:
    """The first position a request's steering touches: the last prompt token in "response" mode, else 0. KV
    before it is the unsteered model's (engine core: prefix-cache keys; workers: which tokens get the offset)."""
    return 0 if positions == "all" else max(num_prompt_tokens - 1, 0)


def spans(layers) -> str:
    """Sorted layer indices as runs: "2-3, 10-11" for [2, 3, 10, 11]."""
    starts = [layer for layer in layers if layer - 1 not in layers]
    ends = [layer for layer in layers if layer + 1 not in layers]
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in zip(starts, ends))


def _fail(message: str, parameter: str, value=None):
    raise SteeringError(message, parameter, value)


def _number(value, parameter: str, limits: SteeringLimits) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(f"{parameter} must be a number, got {type(value).__name__} {value!r}", parameter, value)
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    if not math.isfinite(value):
        _fail(f"{parameter} must be finite, got {value}", parameter, value)
    if abs(value) > limits.max_intensity:
        _fail(
            f"{parameter}={value} is outside the allowed range "
            f"[-{limits.max_intensity}, {limits.max_intensity}] (option max_intensity)",
            parameter,
            value,
        )
    return value


def _emotion(name, parameter: str, limits: SteeringLimits, set_name: str) -> str:
    """The canonical name of a row: "joy" in the default set, "style/formal" in another."""
    if not isinstance(name, str):
        _fail(f"unknown emotion {name!r} in {parameter}; this server knows {list(limits.emotions)}", parameter, name)
    owner, slash, emotion = name.rpartition("/")
    owner = owner if slash else set_name
    _check_set(owner, parameter, limits, name)
    emotion = emotion.lower()
    if emotion not in limits.sets[owner].emotions:
        known = list(limits.sets[owner].emotions)
        where = "this server knows" if owner == limits.default_set else f"set {owner!r} has"
        _fail(f"unknown emotion {name!r} in {parameter}; {where} {known}", parameter, name)
    return emotion if owner == limits.default_set else f"{owner}/{emotion}"


def _check_set(name, parameter: str, limits: SteeringLimits, value) -> None:
    if not isinstance(name, str) or name not in limits.sets:
        _fail(f"unknown vector set {name!r} in {parameter}; this server has {list(limits.sets)}", parameter, value)
    if name in limits.busy:
        _fail(f"vector set {name!r} is being loaded, replaced or unloaded; retry in a moment", parameter, value)


def _set_name(value, parameter: str, limits: SteeringLimits) -> str:
    if value is None:
        return limits.default_set
    _check_set(value, parameter, limits, value)
    return value


def _nested_parts(block):
    if not isinstance(block, dict):
        _fail(f"'emosteer' must be an object, got {type(block).__name__}", "emosteer", block)
    unknown = sorted(set(block) - set(NESTED_KEYS))
    if unknown:
        _fail(f"unknown keys {unknown} in 'emosteer'; allowed: {list(NESTED_KEYS)}", "emosteer", unknown)
    emotions = block.get("emotions", {})
    if not isinstance(emotions, dict):
        _fail(
            "emosteer.emotions must be an object like {\"joy\": 2.0}, "
            f"got {type(emotions).__name__}",
            "emosteer.emotions",
            emotions,
        )
    pairs = [(name, value, "emosteer.emotions", f"emosteer.emotions.{name}") for name, value in emotions.items()]
    return pairs, block.get("positions"), block.get("layers"), block.get("raw"), block.get("set")


def _flat_parts(extra_args: dict):
    pairs = []
    if "emotion" in extra_args or "intensity" in extra_args:
        if "emotion" not in extra_args:
            _fail("'intensity' given without 'emotion'", "emotion")
        pairs.append((extra_args["emotion"], extra_args.get("intensity", 1.0), "emotion", "intensity"))
    if "emotions" in extra_args or "intensities" in extra_args:
        names = extra_args.get("emotions")
        values = extra_args.get("intensities")
        if not isinstance(names, list) or not isinstance(values, list):
            _fail("'emotions' and 'intensities' must both be lists", "emotions", names)
        if len(names) != len(values):
            _fail(
                f"'emotions' has {len(names)} entries but 'intensities' has {len(values)}",
                "intensities",
                values,
            )
        pairs += [(n, v, "emotions", f"intensities[{i}]") for i, (n, v) in enumerate(zip(names, values))]
    return (pairs, extra_args.get("steer_positions"), extra_args.get("steer_layers"), extra_args.get("steer_raw"),
            extra_args.get("steer_set"))


def _near_misses(extra_args: dict) -> list[str]:
    """Keys that look like a steering field but are not one ("Emotion", "emotions ", "steer_layer"), and next to
    flat steering fields the nested names ("positions": the flat form spells it "steer_positions")."""
    known = set(FLAT_KEYS) | {"emosteer"}
    flat = any(key in extra_args for key in FLAT_KEYS)
    return [key for key in extra_args if isinstance(key, str) and key not in known
            and (key.strip().lower() in known or key.strip().lower().startswith("steer_")
                 or (flat and key.strip().lower() in FLAT_NAMES))]


def has_steering_args(extra_args) -> bool:
    return isinstance(extra_args, dict) and (
        "emosteer" in extra_args or any(key in extra_args for key in FLAT_KEYS) or bool(_near_misses(extra_args))
    )


def parse_steering(extra_args, limits: SteeringLimits) -> SteeringSpec | None:
    """The validated spec of a request, or None when it asks for no steering (or only zero intensities).

    Raises SteeringError naming the offending field."""
    if not has_steering_args(extra_args):
        return None
    misses = _near_misses(extra_args)
    if misses:
        flat = FLAT_NAMES.get(misses[0].strip().lower())
        hint = (f"the flat form spells it {flat!r}" if flat
                else f"the steering fields are {list(FLAT_KEYS)} (or one nested 'emosteer' object)")
        _fail(f"unknown steering field {misses[0]!r}; {hint}", misses[0], misses[0])
    if "emosteer" in extra_args:
        if any(key in extra_args for key in FLAT_KEYS):
            _fail("give either the nested 'emosteer' object or the flat keys, not both", "emosteer")
        pairs, positions, layers, raw, set_name = _nested_parts(extra_args["emosteer"])
        names = {"positions": "emosteer.positions", "layers": "emosteer.layers", "raw": "emosteer.raw",
                 "set": "emosteer.set"}
    else:
        pairs, positions, layers, raw, set_name = _flat_parts(extra_args)
        names = {"positions": "steer_positions", "layers": "steer_layers", "raw": "steer_raw", "set": "steer_set"}
    set_name = _set_name(set_name, names["set"], limits)

    intensities: dict[str, float] = {}
    for name, value, name_parameter, value_parameter in pairs:
        emotion = _emotion(name, name_parameter, limits, set_name)
        if emotion in intensities:
            _fail(f"emotion {emotion!r} given twice", name_parameter, name)
        intensities[emotion] = _number(value, value_parameter, limits)
    if len(intensities) > limits.max_emotions:
        _fail(
            f"{len(intensities)} emotions given, at most {limits.max_emotions} allowed (option max_emotions)",
            "emosteer.emotions" if "emosteer" in extra_args else "emotions",
        )

    if not pairs and "emosteer" not in extra_args:  # flat steer_* fields alone would silently steer nothing
        given = [names[k] for k in ("positions", "layers", "raw", "set")
                 if extra_args.get(names[k]) is not None]
        if given:
            _fail(f"{given[0]} given without any emotion", given[0])
    if positions is None:
        positions = "response"
    if positions not in POSITION_MODES:
        _fail(f"unknown position mode {positions!r}; allowed: {list(POSITION_MODES)}", names["positions"], positions)

    if layers is not None:
        valid = (
            isinstance(layers, (list, tuple))
            and len(layers) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
        )
        if not valid or not 0 <= layers[0] <= layers[1] < limits.num_layers:
            _fail(
                f"{names['layers']} must be [first, last] with 0 <= first <= last < {limits.num_layers}, "
                f"got {layers!r}",
                names["layers"],
                layers,
            )
        layers = (layers[0], layers[1])

    if raw is None:
        raw = False
    if "emosteer" not in extra_args and isinstance(raw, (int, str)):  # vllm_xargs has no bool: true arrives as 1
        raw = FLAT_BOOLS.get(raw.lower() if isinstance(raw, str) else raw, raw)
    if not isinstance(raw, bool):
        _fail(f"{names['raw']} must be true or false, got {raw!r}", names["raw"], raw)

    active = tuple(sorted((e, v) for e, v in intensities.items() if v != 0.0))
    if not active:
        return None
    if layers is not None:
        for owner in sorted({split_name(e, limits.default_set)[0] for e, _ in active}):
            hooked = limits.sets[owner].hooked
            where = "" if owner == limits.default_set else f" for set {owner!r}"
            if hooked and not hooked[0] <= layers[0] <= layers[1] <= hooked[-1]:
                _fail(f"{names['layers']} {list(layers)} reaches layers this engine does not steer{where}; it "
                      f"steers layers {hooked[0]}-{hooked[-1]} (engine option layers and the vectors' layers)",
                      names["layers"], list(layers))
            if hooked and not any(layers[0] <= layer <= layers[1] for layer in hooked):  # a gap in the set's layers
                _fail(f"no steered layer in {names['layers']} {list(layers)}{where}: it steers layers "
                      f"{spans(hooked)}", names["layers"], list(layers))
    for emotion, value in active:
        owner, plain = split_name(emotion, limits.default_set)
        set_limits = limits.sets[owner]
        if set_limits.max_dose is None:
            continue
        per_unit = {e: (calibrated, per_alpha) for e, calibrated, per_alpha in set_limits.doses}
        dose = abs(value) * per_unit[plain][1 if raw else 0]
        if dose > set_limits.max_dose * (1 + 1e-6):
            _fail(
                f"{emotion} at {value} reaches a relative dose of {dose:.3g} at some layer, above the "
                f"allowed {set_limits.max_dose:g} (option max_dose)",
                "emosteer.emotions" if "emosteer" in extra_args else "intensity",
                value,
            )
    return SteeringSpec(active, positions, layers, raw)


def steer(positions: str = "response", layers: tuple[int, int] | None = None, raw: bool = False,
          set: str | None = None, **emotions):  # noqa: A002  "set" is the request field's name
    """The `extra_args` for a steered request: `SamplingParams(extra_args=steer(joy=2.0, fear=0.5))`; rows of
    another vector set: `steer(set="style", formal=1.0)` or `steer(**{"style/formal": 1.0, "joy": 0.5})`."""
    block: dict = {"emotions": dict(emotions), "positions": positions, "raw": raw}
    if layers is not None:
        block["layers"] = list(layers)
    if set is not None:
        block["set"] = set
    return {"emosteer": block}


def referenced_sets(extra_args) -> set[str | None]:
    """The vector sets a request's steering fields name, without validating them (None: the default set)."""
    if not has_steering_args(extra_args):
        return set()
    block = extra_args.get("emosteer")
    block = block if isinstance(block, dict) else extra_args
    chosen = block.get("set" if block is not extra_args else "steer_set")
    chosen = chosen if isinstance(chosen, str) else None
    emotions = block.get("emotions")
    names = list(emotions) if isinstance(emotions, (dict, list)) else []
    names += [block.get("emotion")] if block is extra_args else []
    return {name.rpartition("/")[0] if isinstance(name, str) and "/" in name else chosen for name in names} or {chosen}
