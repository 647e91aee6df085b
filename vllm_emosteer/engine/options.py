"""Engine-level options: `additional_config={"emosteer": {...}}` (`--additional-config` for `vllm serve`).

    vectors        path of the vectors file, or named sets {"emotions": "a.safetensors", "style": "b.safetensors"}
                   (the first is the default set); default: the bundled vectors, if they fit the model
    max_sets       how many vector sets the engine has room for (default: the number given); sets loaded at run
                   time fill the rest
    sets_dir       the only folder runtime loads may read from (needs VLLM_EMOSTEER_ALLOW_RUNTIME_UPDATES=1)
    capture        "attn_out" or "residual": capture mode, for extraction inside vLLM (capture.py); without
                   vectors, every layer is hooked with zero vectors
    max_intensity  largest |intensity| a request may ask for (default 8.0)
    max_dose       largest relative dose (|offset| / typical activation norm, per layer) a request may reach, for
                   vectors files that record typical norms (default 1.0)
    max_emotions   most emotions one request may mix (default: all in the file)
    layers         [first, last]: steer only these model layers (default: every layer in the file)
    mode           "fused" (default) or "naive" (a Python loop over requests in every layer; for benchmarks)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path

import torch

from ..vectors.bank import HOOKS, BankError, EmotionBank, config_fingerprint, model_facts
from .sets import DEFAULT_SET, VectorSets, check_set_name
from .spec import SteeringLimits

CONFIG_KEY = "emosteer"
OPTION_KEYS = ("vectors", "max_intensity", "max_dose", "max_emotions", "layers", "mode", "max_sets", "sets_dir",
               "capture")
# Internal: set by the plugin at start-up to `config_digest`, so that vLLM's config hash (its compile-cache key)
# changes with the vectors file's contents, not only with its path. Workers check it against the file they load.
DIGEST_KEY = "_digest"
MODES = ("fused", "naive")
BUNDLED_VECTORS = "data/smollm2-135m-instruct.safetensors"


class EmosteerConfigError(ValueError):
    """The engine's emosteer options or vectors file are unusable; the engine refuses to start."""


def bundled_vectors_path() -> Path:
    return Path(str(resources.files("vllm_emosteer").joinpath(BUNDLED_VECTORS)))


def vectors_path(path: str | None) -> Path:
    """The vectors file a user named, or the bundled one."""
    return Path(path).expanduser() if path else bundled_vectors_path()


@lru_cache(maxsize=8)
def _load_bank(path: str, mtime: float) -> EmotionBank:
    return EmotionBank.load(path)


def load_bank(path: Path) -> EmotionBank:
    return _load_bank(str(path), path.stat().st_mtime if path.exists() else 0.0)


@dataclass(frozen=True)
class EmosteerOptions:
    sets: VectorSets
    max_intensity: float
    max_emotions: int
    layers: tuple[int, int] | None
    mode: str
    num_model_layers: int
    max_dose: float = 1.0
    sets_dir: Path | None = None
    capture: str | None = None

    @property
    def bank(self) -> EmotionBank:
        """The default set's vectors."""
        return self.sets.default.bank

    @property
    def limits(self) -> SteeringLimits:  # cached by the sets until one is loaded or unloaded
        return self.sets.limits

    def steered_rows(self) -> list[int]:
        """Rows of the device bank whose layers get a hook."""
        return self.sets.steered_rows()

    @cached_property
    def config_digest(self) -> str:
        """What compiled graphs depend on: the start sets (vectors, layers, hook, emotions and the metadata that
        scales them, all in each bank's digest) and the bank's layout."""
        start = [(s.name, s.digest, s.block) for s in self.sets.by_name.values()]
        return hashlib.sha256(repr((start, self.sets.max_sets, self.sets.width)).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """What clients may discover about this server's steering (the top level: the default set)."""
        default = self.sets.default
        return {
            "emotions": self.bank.emotions,
            "hook": self.bank.hook,
            "layers": [self.sets.layers[r] for r in self.sets.steered_rows(self.bank)],
            "num_model_layers": self.num_model_layers,
            "max_intensity": self.max_intensity,
            "max_emotions": self.max_emotions,
            "calibrated": dict(self.bank.calibration),
            "units": self.bank.units,
            "bands": dict(self.bank.bands),
            "max_dose": self.max_dose if self.bank.typical_norms is not None else None,
            "positions": ["response", "all"],
            "vectors": default.source,
            "default_set": default.name,
            "sets": self.sets.describe(),
            "max_sets": self.sets.max_sets,
        }


def is_enabled(vllm_config) -> bool:
    extra = getattr(vllm_config, "additional_config", None) or {}
    return isinstance(extra, dict) and CONFIG_KEY in extra


def frontend_options(processor) -> EmosteerOptions:
    """The options of a front-end (vLLM's InputProcessor), built once: its vector-set registry lives in them."""
    options = getattr(processor, "_emosteer_options", None)
    if options is None:
        options = options_from_vllm_config(processor.vllm_config)
        processor._emosteer_options = options
    return options


def options_from_vllm_config(vllm_config) -> EmosteerOptions:
    raw = vllm_config.additional_config[CONFIG_KEY]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise EmosteerConfigError(f"additional_config.emosteer must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(OPTION_KEYS) - {DIGEST_KEY})
    if unknown:
        raise EmosteerConfigError(f"unknown emosteer options {unknown}; known: {list(OPTION_KEYS)}")
    hf_config = vllm_config.model_config.hf_config
    sets_dir = raw.get("sets_dir")
    if sets_dir is not None:
        if not isinstance(sets_dir, str) or not Path(sets_dir).expanduser().is_dir():
            raise EmosteerConfigError(f"emosteer.sets_dir must name an existing folder, got {sets_dir!r}")
        sets_dir = Path(sets_dir).expanduser().resolve()
    capture = raw.get("capture")
    if capture is not None and capture not in HOOKS:
        raise EmosteerConfigError(f"emosteer.capture must be one of {list(HOOKS)}, got {capture!r}")
    if capture is not None and raw.get("vectors") is None:
        start = {"capture": (_zero_bank(hf_config, capture), "zero vectors (capture mode)")}
    else:
        start = _start_sets(raw.get("vectors"), hf_config, sets_dir)
    if capture is not None and next(iter(start.values()))[0].hook != capture:
        raise EmosteerConfigError(f"emosteer.capture {capture!r} differs from the vectors' hook point")

    num_layers = int(vllm_config.model_config.hf_text_config.num_hidden_layers)
    max_intensity = raw.get("max_intensity", 8.0)
    if isinstance(max_intensity, bool) or not isinstance(max_intensity, (int, float)) or not max_intensity > 0:
        raise EmosteerConfigError(f"emosteer.max_intensity must be a positive number, got {max_intensity!r}")
    max_sets = raw.get("max_sets", len(start))
    if isinstance(max_sets, bool) or not isinstance(max_sets, int) or max_sets < 1:
        raise EmosteerConfigError(f"emosteer.max_sets must be a positive integer, got {max_sets!r}")
    # default: every row of every set the engine has room for
    max_emotions = raw.get("max_emotions", max_sets * max(len(bank.emotions) for bank, _ in start.values()))
    if isinstance(max_emotions, bool) or not isinstance(max_emotions, int) or max_emotions < 1:
        raise EmosteerConfigError(f"emosteer.max_emotions must be a positive integer, got {max_emotions!r}")
    layers = raw.get("layers")
    if layers is not None:
        if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(x, int) for x in layers)
                and 0 <= layers[0] <= layers[1] < num_layers):
            raise EmosteerConfigError(
                f"emosteer.layers must be [first, last] with 0 <= first <= last < {num_layers}, got {layers!r}"
            )
        layers = tuple(layers)
    max_dose = raw.get("max_dose", 1.0)
    if isinstance(max_dose, bool) or not isinstance(max_dose, (int, float)) or not max_dose > 0:
        raise EmosteerConfigError(f"emosteer.max_dose must be a positive number, got {max_dose!r}")
    mode = raw.get("mode", "fused")
    if mode not in MODES:
        raise EmosteerConfigError(f"emosteer.mode must be one of {list(MODES)}, got {mode!r}")
    try:
        sets = VectorSets(start, max_sets, num_layers, layers, float(max_intensity), max_emotions, float(max_dose))
    except BankError as exc:
        raise EmosteerConfigError(f"emosteer: {exc}") from None
    options = EmosteerOptions(sets, float(max_intensity), max_emotions, layers, mode, num_layers, float(max_dose),
                              sets_dir, capture)
    if DIGEST_KEY in raw and raw[DIGEST_KEY] != options.config_digest:
        raise EmosteerConfigError("emosteer: a vectors file changed after the engine started; restart it")
    return options


def _zero_bank(hf_config, hook: str) -> EmotionBank:
    facts = model_facts(hf_config)
    zeros = torch.zeros(facts["num_layers"], 1, facts["hidden_size"])
    return EmotionBank(zeros, ["none"], hook, list(range(facts["num_layers"])), facts)


def shown_name(path: Path, sets_dir: Path | None) -> str:
    """How clients see a server file: its path relative to sets_dir, else its file name (never a server path)."""
    resolved = path.resolve()
    if sets_dir is not None and resolved.is_relative_to(sets_dir):
        return str(resolved.relative_to(sets_dir))
    return path.name


def _start_sets(vectors, hf_config, sets_dir: Path | None) -> dict[str, tuple[EmotionBank, str]]:
    """The vector sets named in the options (a single path is the set "emotions"), loaded and checked; each with
    the name clients see it by."""
    if vectors is None or isinstance(vectors, str):
        named = {DEFAULT_SET: vectors}
    elif isinstance(vectors, dict) and vectors and all(isinstance(p, str) for p in vectors.values()):
        named = vectors
    else:
        raise EmosteerConfigError(f"emosteer.vectors must be a path or an object {{name: path}}, got {vectors!r}")
    start = {}
    for name, given in named.items():
        path = vectors_path(given)
        try:
            check_set_name(name)
            bank = load_bank(path)
            if not given and bank.model.get("config_fingerprint") != config_fingerprint(hf_config):
                raise BankError(
                    f"no vectors file given, and the bundled vectors are for {bank.model.get('name')}, not this "
                    "model; pass additional_config {\"emosteer\": {\"vectors\": PATH}} (make one with "
                    "`vllm-emosteer extract`)"
                )
            bank.check_fits(hf_config)
        except BankError as exc:
            prefix = f"set {name!r}: " if len(named) > 1 else ""
            raise EmosteerConfigError(f"emosteer: {prefix}{exc}") from None
        start[name] = (bank, shown_name(path, sets_dir))
    return start
