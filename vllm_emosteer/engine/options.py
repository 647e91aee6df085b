"""Engine-level options: `additional_config={"emosteer": {...}}` (`--additional-config` for `vllm serve`).

    vectors        path of the vectors file; default: the bundled vectors, if they fit the model
    max_intensity  largest |intensity| a request may ask for (default 8.0)
    max_dose       largest relative dose (|offset| / typical activation norm, per layer) a request may reach, for
                   vectors files that record typical norms (default 1.0)
    max_emotions   most emotions one request may mix (default: all in the file)
    layers         [first, last]: steer only these model layers (default: every layer in the file)
    mode           "fused" (default) or "naive" (a Python loop over requests in every layer; for benchmarks)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path

from ..vectors.bank import BankError, EmotionBank, config_fingerprint
from .spec import SteeringLimits

CONFIG_KEY = "emosteer"
OPTION_KEYS = ("vectors", "max_intensity", "max_dose", "max_emotions", "layers", "mode")
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
    bank: EmotionBank
    vectors_path: Path
    max_intensity: float
    max_emotions: int
    layers: tuple[int, int] | None
    mode: str
    num_model_layers: int
    max_dose: float = 1.0

    @cached_property
    def limits(self) -> SteeringLimits:  # cached: the front-end checks every request against it
        return SteeringLimits(
            emotions=tuple(self.bank.emotions),
            num_layers=self.num_model_layers,
            max_intensity=self.max_intensity,
            max_emotions=self.max_emotions,
            max_dose=self.max_dose if self.bank.typical_norms is not None else None,
            doses=self._doses(),
        )

    def _doses(self) -> tuple[tuple[str, float, float], ...]:
        """Per emotion: the largest relative dose over layers per unit of intensity, and per unit of raw alpha."""
        per_alpha = self.bank.dose_per_alpha()
        if per_alpha is None:
            return ()
        rows = self.steered_rows()
        result = []
        for e, emotion in enumerate(self.bank.emotions):
            raw = float(per_alpha[rows, e].max())
            calibrated = self.bank.scale(emotion) * (1.0 if self.bank.units == "dose" else raw)
            result.append((emotion, abs(calibrated), raw))
        return tuple(result)

    def steered_rows(self) -> list[int]:
        """Rows of the bank whose layers get a hook."""
        first, last = self.layers if self.layers else (0, self.num_model_layers - 1)
        return [row for row, layer in enumerate(self.bank.layers) if first <= layer <= last]

    @cached_property
    def bank_digest(self) -> str:
        return self.bank.digest()

    @property
    def config_digest(self) -> str:
        """What compiled graphs depend on: the vectors, the file's layers, hook and emotions (all in the bank's
        digest, which also covers its scaling metadata)."""
        return self.bank_digest

    def describe(self) -> dict:
        """What clients may discover about this server's steering."""
        return {
            "emotions": self.bank.emotions,
            "hook": self.bank.hook,
            "layers": [self.bank.layers[r] for r in self.steered_rows()],
            "num_model_layers": self.num_model_layers,
            "max_intensity": self.max_intensity,
            "max_emotions": self.max_emotions,
            "calibrated": dict(self.bank.calibration),
            "units": self.bank.units,
            "bands": dict(self.bank.bands),
            "max_dose": self.max_dose if self.bank.typical_norms is not None else None,
            "positions": ["response", "all"],
            "vectors": str(self.vectors_path),
        }


def is_enabled(vllm_config) -> bool:
    extra = getattr(vllm_config, "additional_config", None) or {}
    return isinstance(extra, dict) and CONFIG_KEY in extra


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

    path = vectors_path(raw.get("vectors"))
    try:
        bank = load_bank(path)
        if not raw.get("vectors") and bank.model.get("config_fingerprint") != config_fingerprint(hf_config):
            raise BankError(
                f"no vectors file given, and the bundled vectors are for {bank.model.get('name')}, not this model; "
                "pass additional_config {\"emosteer\": {\"vectors\": PATH}} (make one with `vllm-emosteer extract`)"
            )
        bank.check_fits(hf_config)
    except BankError as exc:
        raise EmosteerConfigError(f"emosteer: {exc}") from None

    num_layers = int(vllm_config.model_config.hf_text_config.num_hidden_layers)
    max_intensity = raw.get("max_intensity", 8.0)
    if isinstance(max_intensity, bool) or not isinstance(max_intensity, (int, float)) or not max_intensity > 0:
        raise EmosteerConfigError(f"emosteer.max_intensity must be a positive number, got {max_intensity!r}")
    max_emotions = raw.get("max_emotions", len(bank.emotions))
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
    options = EmosteerOptions(bank, path, float(max_intensity), max_emotions, layers, mode, num_layers,
                              float(max_dose))
    if DIGEST_KEY in raw and raw[DIGEST_KEY] != options.config_digest:
        raise EmosteerConfigError(f"emosteer: the vectors file {path} changed after the engine started; restart it")
    if not options.steered_rows():
        raise EmosteerConfigError(f"emosteer.layers {layers} selects none of the file's layers {bank.layers}")
    return options
