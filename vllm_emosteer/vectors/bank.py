"""The emotion-vector file ("bank"): one safetensors tensor [L, E, H] plus JSON metadata."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "vllm-emosteer-bank"
FORMAT_VERSION = 2  # 2: units, typical_norms, bands (a version-1 file loads as units "alpha", no bands)
HOOKS = ("attn_out", "residual")
UNITS = ("alpha", "dose")
TENSOR_NAME = "vectors"
FINGERPRINT_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)

logger = logging.getLogger(__name__)


class BankError(ValueError):
    """A vectors file that cannot be read or does not fit the model."""


def text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def config_fingerprint(config) -> str:
    cfg = text_config(config)
    values = {key: getattr(cfg, key, None) for key in FINGERPRINT_KEYS}
    if not values["architectures"]:
        values["architectures"] = getattr(config, "architectures", None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_facts(config, name: str | None = None) -> dict:
    cfg = text_config(config)
    architectures = getattr(config, "architectures", None) or getattr(cfg, "architectures", None) or []
    return {
        "name": name,
        "architecture": architectures[0] if architectures else None,
        "hidden_size": int(cfg.hidden_size),
        "num_layers": int(cfg.num_hidden_layers),
        "config_fingerprint": config_fingerprint(config),
    }


def _listed(value, what: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise BankError(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


def _integer(value, what: str, whole) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)  # int, numpy and 0-d torch integers; never a float or a string
    except TypeError:
        raise BankError(f"{what} must be integers, got {whole!r}") from None


def _finite(value, what: str) -> float:
    """Every number a vectors file holds is checked (JSON allows NaN and Infinity)."""
    try:
        if isinstance(value, (bool, str, bytes)) or value is None:
            raise TypeError
        number = float(value)
    except OverflowError:
        number = math.inf
    except (TypeError, ValueError):
        raise BankError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise BankError(f"{what} must be finite, got {value!r}")
    return number


@dataclass
class EmotionBank:
    vectors: torch.Tensor  # [L, E, H] float32
    emotions: list[str]
    hook: str
    layers: list[int]  # model layer index of each row of `vectors`
    model: dict = field(default_factory=dict)  # architecture, hidden_size, num_layers, config_fingerprint, name
    recipe: dict = field(default_factory=dict)
    # emotion -> what intensity 1.0 means: an alpha (units "alpha") or a relative dose (units "dose")
    calibration: dict[str, float] = field(default_factory=dict)
    # "alpha": offset = alpha * EV[l, e] (the paper's). "dose": offset = dose * typical_norms[l] * unit(EV[l, e]),
    # so one number means the same push at every layer and in every model
    units: str = "alpha"
    typical_norms: list[float] | None = None  # per row: median token norm of the hooked activation (extraction)
    bands: dict[str, list[int]] = field(default_factory=dict)  # emotion -> [first, last] layers it steers by default

    def __post_init__(self):
        if not isinstance(self.vectors, torch.Tensor):
            raise BankError(f"vectors must be a tensor, got {type(self.vectors).__name__}")
        self.vectors = self.vectors.detach().to(torch.float32).contiguous()
        if not isinstance(self.emotions, (list, tuple)) or not all(isinstance(e, str) and e for e in self.emotions):
            raise BankError(f"emotion names must be a list of non-empty strings, got {self.emotions!r}")
        self.emotions = [e.lower() for e in self.emotions]
        self.layers = [_integer(x, "layer indices", self.layers) for x in _listed(self.layers, "layers")]
        for name in ("model", "recipe", "calibration", "bands"):
            if not isinstance(getattr(self, name), dict):
                raise BankError(f"{name} must be an object, got {type(getattr(self, name)).__name__}")
        self.calibration = {e: _finite(v, f"calibration of {e}") for e, v in self.calibration.items()}
        self._check_consistent()

    def _check_consistent(self):
        if self.vectors.dim() != 3:
            raise BankError(f"vectors must be [layers, emotions, hidden], got shape {list(self.vectors.shape)}")
        L, E, H = self.vectors.shape
        if len(self.emotions) != E or len(set(self.emotions)) != E:
            raise BankError(f"bank has {E} emotion rows but emotion names {self.emotions}")
        if len(self.layers) != L or len(set(self.layers)) != L or any(x < 0 for x in self.layers):
            raise BankError(f"bank has {L} layer rows but layer indices {self.layers}")
        if self.hook not in HOOKS:
            raise BankError(f"unknown hook point {self.hook!r}; known: {list(HOOKS)}")
        for key in ("hidden_size", "num_layers"):
            if self.model.get(key) is not None:
                _integer(self.model[key], f"model.{key}", self.model[key])
        if self.model.get("hidden_size") not in (None, H):
            raise BankError(f"metadata says hidden size {self.model['hidden_size']}, tensor has {H}")
        if not torch.isfinite(self.vectors).all():
            raise BankError("vectors contain NaN or inf")
        unknown = (set(self.calibration) | set(self.bands)) - set(self.emotions)
        if unknown:
            raise BankError(f"calibration names emotions not in the bank: {sorted(unknown)}")
        if self.units not in UNITS:
            raise BankError(f"unknown units {self.units!r}; known: {list(UNITS)}")
        if self.typical_norms is not None:
            norms = [_finite(v, "typical_norms") for v in _listed(self.typical_norms, "typical_norms")]
            if len(norms) != L or not all(v > 0 for v in norms):
                raise BankError(f"typical_norms must hold {L} positive numbers, got {self.typical_norms}")
            self.typical_norms = norms
        if self.units == "dose" and self.typical_norms is None:
            raise BankError("units 'dose' need typical_norms (re-extract with `vllm-emosteer extract`)")
        for emotion, band in self.bands.items():
            if not (isinstance(band, (list, tuple)) and len(band) == 2):
                raise BankError(f"band of {emotion} must be [first, last] layer indices, got {band!r}")
            first, last = (_integer(x, f"band of {emotion}", band) for x in band)
            if not 0 <= first <= last:
                raise BankError(f"band of {emotion} must be [first, last] layer indices, got {band!r}")
            self.bands[emotion] = [first, last]

    @property
    def hidden_size(self) -> int:
        return self.vectors.shape[2]

    def norms(self) -> torch.Tensor:
        return self.vectors.norm(dim=-1)  # [L, E]

    def without_shared_component(self) -> "EmotionBank":
        """Each emotion minus the mean of all emotions, per layer: what they share ("emotional vs neutral")
        is removed, what tells them apart stays. Calibration is dropped (the vectors changed)."""
        shared = self.vectors.mean(dim=1, keepdim=True)
        recipe = dict(self.recipe, transform=self.recipe.get("transform", []) + ["remove shared component"])
        return EmotionBank(self.vectors - shared, self.emotions, self.hook, self.layers, dict(self.model), recipe,
                           units=self.units, typical_norms=self.typical_norms)

    def uncalibrated(self) -> "EmotionBank":
        """The same vectors without calibration or bands: an intensity is then a plain dose (or alpha)."""
        return EmotionBank(self.vectors, self.emotions, self.hook, self.layers, dict(self.model), dict(self.recipe),
                           units=self.units, typical_norms=self.typical_norms)

    def select_layers(self, first: int, last: int) -> "EmotionBank":
        """Only the rows of layers first..last: an engine using this file hooks only those layers."""
        keep = [row for row, layer in enumerate(self.layers) if first <= layer <= last]
        if not keep:
            raise BankError(f"no layer of {self.layers} is in [{first}, {last}]")
        recipe = dict(self.recipe, transform=self.recipe.get("transform", []) + [f"layers {first}-{last}"])
        norms = [self.typical_norms[r] for r in keep] if self.typical_norms else None
        return EmotionBank(self.vectors[keep], self.emotions, self.hook, [self.layers[r] for r in keep],
                           dict(self.model), recipe, units=self.units, typical_norms=norms)

    def scale(self, emotion: str) -> float:
        return float(self.calibration.get(emotion, 1.0))

    def dose_per_alpha(self) -> torch.Tensor | None:
        """[L, E]: the relative dose |EV[l, e]| / typical_norms[l] that one unit of raw alpha adds (None: no norms)."""
        if self.typical_norms is None:
            return None
        return self.norms() / torch.tensor(self.typical_norms)[:, None]

    def coefficients(self, intensities: dict[str, float], raw: bool = False,
                     layers: tuple[int, int] | None = None) -> torch.Tensor:
        """[L, E]: the factor of EV[l, e] that a request adds at each row, so offset_l = sum_e c[l, e] * EV[l, e].

        raw: intensities are alphas on every layer (or `layers`). Otherwise intensity x the calibrated scale, in
        the file's units, on `layers`, else the emotion's calibrated band, else every layer."""
        coeff = torch.zeros(self.vectors.shape[:2], dtype=torch.float64)
        rows = torch.tensor(self.layers)
        unit = (torch.tensor(self.typical_norms, dtype=torch.float64)[:, None]
                / self.norms().double().clamp_min(1e-12)) if self.units == "dose" else None
        for emotion, intensity in intensities.items():
            e = self.emotions.index(emotion)
            first, last = layers or (None if raw else self.bands.get(emotion)) or (0, max(self.layers))
            in_band = ((rows >= first) & (rows <= last)).double()
            if raw:
                coeff[:, e] = intensity * in_band
            elif unit is None:
                coeff[:, e] = intensity * self.scale(emotion) * in_band
            else:
                coeff[:, e] = intensity * self.scale(emotion) * unit[:, e] * in_band
        return coeff.float()

    def digest(self) -> str:
        """Everything that decides what a request adds: the vectors and the metadata that scales them."""
        h = hashlib.sha256(self.vectors.numpy().tobytes())
        h.update(json.dumps([self.units, self.typical_norms, self.calibration, self.bands, self.layers,
                             self.hook, self.emotions], sort_keys=True).encode())
        return h.hexdigest()[:16]

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "emotions": self.emotions,
            "hook": self.hook,
            "layers": self.layers,
            "model": self.model,
            "recipe": self.recipe,
            "calibration": self.calibration,
            "units": self.units,
            "typical_norms": self.typical_norms,
            "bands": self.bands,
            "norms": [[round(float(v), 6) for v in row] for row in self.norms()],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary file in the same folder, fsynced, then renamed over `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({TENSOR_NAME: self.vectors}, tmp, metadata={"emosteer": json.dumps(self.metadata())})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> "EmotionBank":
        """`name`: how messages call the file (default: its path), e.g. a path relative to the folder it is in."""
        path = Path(path)
        where = name or str(path)
        if not path.is_file():
            raise BankError(f"vectors file not found: {where}")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = (f.metadata() or {}).get("emosteer")
                if TENSOR_NAME not in f.keys():
                    raise BankError(f"{where}: no '{TENSOR_NAME}' tensor; is this an emosteer vectors file?")
                vectors = f.get_tensor(TENSOR_NAME)
        except BankError:
            raise
        except Exception as exc:  # safetensors raises several types for corrupt or truncated files
            raise BankError(f"{where}: not a readable safetensors file ({type(exc).__name__})") from exc
        if raw_meta is None:
            raise BankError(f"{where}: no emosteer metadata; is this an emosteer vectors file?")
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as exc:
            raise BankError(f"{where}: corrupt metadata ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise BankError(f"{where}: not an emosteer vectors file (format {FORMAT!r} expected)")
        version = meta.get("format_version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise BankError(f"{where}: format_version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise BankError(
                f"{where}: format version {version} is newer than this plugin's ({FORMAT_VERSION}); upgrade "
                "vllm-emosteer"
            )
        return cls.from_parts(vectors, meta, where)

    @classmethod
    def from_parts(cls, vectors: torch.Tensor, meta: dict, where: str = "vectors") -> "EmotionBank":
        """A bank from its tensor and its metadata (`metadata()`), as read from a file or sent to a worker."""
        try:
            return cls(
                vectors=vectors,
                emotions=meta["emotions"],
                hook=meta["hook"],
                layers=meta["layers"],
                model=meta.get("model", {}),
                recipe=meta.get("recipe", {}),
                calibration=meta.get("calibration", {}),
                units=meta.get("units", "alpha"),
                typical_norms=meta.get("typical_norms"),
                bands=meta.get("bands", {}),
            )
        except KeyError as exc:
            raise BankError(f"{where}: metadata lacks {exc}") from exc
        except BankError as exc:
            raise BankError(f"{where}: {exc}") from None
        except (TypeError, ValueError, AttributeError) as exc:  # a field of the wrong shape or type
            raise BankError(f"{where}: malformed metadata ({exc})") from None

    def check_fits(self, config) -> None:
        """Refuse a model this bank was not made for, saying what differs."""
        facts = model_facts(config)
        problems = []
        if self.hidden_size != facts["hidden_size"]:
            problems.append(f"vectors have hidden size {self.hidden_size}, model has {facts['hidden_size']}")
        if max(self.layers) >= facts["num_layers"]:
            problems.append(
                f"vectors cover layers up to {max(self.layers)}, model has {facts['num_layers']} layers"
            )
        if self.model.get("num_layers") not in (None, facts["num_layers"]):
            problems.append(
                f"vectors were made for a {self.model['num_layers']}-layer model, model has {facts['num_layers']}"
            )
        arch = self.model.get("architecture")
        if arch and facts["architecture"] and arch != facts["architecture"]:
            problems.append(f"vectors were made for {arch}, model is {facts['architecture']}")
        if problems:
            raise BankError("vectors file does not fit the model: " + "; ".join(problems))
        fingerprint = self.model.get("config_fingerprint")
        if fingerprint and fingerprint != facts["config_fingerprint"]:
            logger.warning(
                "emosteer: the vectors were made for a model with another config (%s) than this one (%s); "
                "shapes match, so they are used",
                self.model.get("name") or fingerprint,
                facts["config_fingerprint"],
            )
