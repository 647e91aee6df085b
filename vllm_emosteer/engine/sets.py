"""The engine's named vector sets, in a layout fixed at start.

The device bank is `[len(layers), max_sets * width, H]`: one block of `width` columns per set, over the layers
hooked at start (the union of the start sets' layers). It is allocated once, so compiled graphs and CUDA graphs
never see a new tensor; loading a set at run time writes its block in place, unloading zeroes it. A set loaded
later must use the same hook point, fit in a block and cover only hooked layers.

Every process keeps its own registry (the front-end validates requests against it, the engine core checks each
request's prefix-cache key with it, each worker scatters coefficients with it); `frontend/set_changes.py` changes
them together, through one collective RPC whose arguments (`update_args`) the engine core reads on the way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from ..vectors.bank import BankError, EmotionBank
from .spec import SetLimits, SteeringLimits, SteeringSpec, spans, split_name

def update_args(name: str, bank: EmotionBank | None, source: str = "") -> tuple:
    """The set-update RPC's arguments: plain bytes and JSON (vLLM's RPC encoder does not round-trip tensors nested
    in the args tuple); bank None unloads the set."""
    if bank is None:
        return (name, None, None, "")
    return (name, bank.vectors.numpy().tobytes(), json.dumps(bank.metadata()), source)


def bank_of_update(vectors: bytes | None, metadata: str | None, source: str) -> EmotionBank | None:
    """The bank a set-update RPC carries (None: an unload)."""
    if vectors is None:
        return None
    meta = json.loads(metadata)
    shape = (len(meta["layers"]), len(meta["emotions"]), -1)
    return EmotionBank.from_parts(torch.frombuffer(bytearray(vectors), dtype=torch.float32).reshape(shape), meta,
                                  source)


SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_SET = "emotions"  # the name of the set given as a single path


@dataclass(frozen=True)
class VectorSet:
    name: str
    bank: EmotionBank
    source: str  # where it was loaded from
    block: int  # its columns are block * width ... block * width + len(emotions) - 1
    digest: str


def check_set_name(name) -> str:
    if not isinstance(name, str) or not SET_NAME.fullmatch(name):
        raise BankError(f"vector set name {name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a "
                        "letter or digit")
    return name


class VectorSets:
    def __init__(self, start: dict[str, tuple[EmotionBank, str]], max_sets: int, num_model_layers: int,
                 layer_range: tuple[int, int] | None, max_intensity: float, max_emotions: int, max_dose: float):
        banks = [bank for bank, _ in start.values()]
        self.hook = banks[0].hook
        self.hidden_size = banks[0].hidden_size
        self.layers = sorted({layer for bank in banks for layer in bank.layers})
        self.row_of_layer = {layer: row for row, layer in enumerate(self.layers)}
        self.width = max(len(bank.emotions) for bank in banks)
        self.max_sets = max_sets
        self.num_model_layers = num_model_layers
        self.layer_range = layer_range
        self.max_intensity, self.max_emotions, self.max_dose = max_intensity, max_emotions, max_dose
        if max_sets < len(start):
            raise BankError(f"max_sets {max_sets} is less than the {len(start)} vector sets given at start")
        self.by_name: dict[str, VectorSet] = {}
        self._limits: SteeringLimits | None = None
        self.busy: set[str] = set()  # front-end: names being changed (see frontend/set_changes.py)
        for name, (bank, source) in start.items():
            self.add(name, bank, source)

    # ---- membership -----------------------------------------------------------------------------------
    def check(self, name: str, bank: EmotionBank) -> None:
        """Refuse a set that does not fit this engine's layout, saying why."""
        check_set_name(name)
        if bank.hook != self.hook:
            raise BankError(f"set {name!r} steers at hook {bank.hook!r}, this engine's sets at {self.hook!r}")
        if bank.hidden_size != self.hidden_size:
            raise BankError(f"set {name!r} has hidden size {bank.hidden_size}, this engine's sets {self.hidden_size}")
        outside = sorted(set(bank.layers) - set(self.layers))
        if outside:
            raise BankError(f"set {name!r} covers layers {outside} that this engine does not hook (hooked: "
                            f"{self.layers[0]}-{self.layers[-1]}, the start sets' layers)")
        if len(bank.emotions) > self.width:
            raise BankError(f"set {name!r} has {len(bank.emotions)} rows; this engine's sets hold at most "
                            f"{self.width} (the widest set at start)")
        hooked = self.steered_layers(bank)
        if not hooked:
            raise BankError(f"set {name!r} has none of its layers {bank.layers} in the steered range "
                            f"{self.layer_range}")
        for emotion, (first, last) in bank.bands.items():
            if not hooked[0] <= first <= last <= hooked[-1]:
                raise BankError(f"set {name!r}: the calibrated band of {emotion}, layers {first}-{last}, reaches "
                                f"layers this engine does not steer (it steers {hooked[0]}-{hooked[-1]}: engine "
                                "option layers and the vectors' layers)")
            if not any(first <= layer <= last for layer in hooked):  # a gap in the set's layers
                raise BankError(f"set {name!r}: no steered layer in layers {first}-{last}, the calibrated band of "
                                f"{emotion} (it steers layers {spans(hooked)})")

    def free_block(self) -> int | None:
        used = {s.block for s in self.by_name.values()}
        return next((b for b in range(self.max_sets) if b not in used), None)

    def add(self, name: str, bank: EmotionBank, source: str, block: int | None = None) -> VectorSet:
        """Register a set (a name already present is replaced in its own block)."""
        self.check(name, bank)
        if block is None:
            block = self.by_name[name].block if name in self.by_name else self.free_block()
        if block is None:
            raise BankError(f"no room for set {name!r}: all {self.max_sets} sets are loaded (option max_sets)")
        self.by_name[name] = VectorSet(name, bank, source, block, bank.digest())
        self._limits = None
        return self.by_name[name]

    def set_busy(self, name: str, busy: bool) -> None:
        (self.busy.add if busy else self.busy.discard)(name)
        self._limits = None

    def remove(self, name: str) -> VectorSet:
        self._limits = None
        return self.by_name.pop(name)

    @property
    def default(self) -> VectorSet:
        return next(iter(self.by_name.values()))

    # ---- layout -----------------------------------------------------------------------------------------
    def steered_rows(self, bank: EmotionBank | None = None) -> list[int]:
        """Rows of the device bank that get a hook (of one set's layers, if given)."""
        first, last = self.layer_range or (0, self.num_model_layers - 1)
        wanted = set(bank.layers) if bank is not None else set(self.layers)
        return [row for row, layer in enumerate(self.layers) if first <= layer <= last and layer in wanted]

    def steered_layers(self, bank: EmotionBank) -> list[int]:
        """The model layers where the set's vectors are added."""
        return [self.layers[row] for row in self.steered_rows(bank)]

    def bank_rows(self, bank: EmotionBank) -> list[int]:
        """The device bank's row of each of the set's layers."""
        return [self.row_of_layer[layer] for layer in bank.layers]

    def columns(self, block: int) -> slice:
        return slice(block * self.width, (block + 1) * self.width)

    def block_tensor(self, vector_set: VectorSet) -> torch.Tensor:
        """[len(layers), width, H]: the set's vectors at its layers' rows, zeros elsewhere."""
        block = torch.zeros(len(self.layers), self.width, self.hidden_size)
        block[self.bank_rows(vector_set.bank), : len(vector_set.bank.emotions)] = vector_set.bank.vectors
        return block

    def device_bank(self, device) -> torch.Tensor:
        bank = torch.zeros(len(self.layers), self.max_sets * self.width, self.hidden_size, device=device)
        for vector_set in self.by_name.values():
            self.write(bank, vector_set)
        return bank

    def write(self, bank: torch.Tensor, vector_set: VectorSet) -> None:
        bank[:, self.columns(vector_set.block)].copy_(self.block_tensor(vector_set))

    def coefficients(self, spec: SteeringSpec) -> torch.Tensor:
        """[len(layers), max_sets * width]: what the request adds, offset_l = sum_c coeff[l, c] * bank[l, c]."""
        coeff = torch.zeros(len(self.layers), self.max_sets * self.width)
        default = self.default.name
        by_set: dict[str, dict[str, float]] = {}
        for name, value in spec.intensities:
            owner, emotion = split_name(name, default)
            by_set.setdefault(owner, {})[emotion] = value
        for owner, intensities in by_set.items():
            vector_set = self.by_name[owner]
            start = self.columns(vector_set.block).start
            part = vector_set.bank.coefficients(intensities, spec.raw, spec.layers)  # [L_set, E_set]
            coeff[self.bank_rows(vector_set.bank), start: start + part.shape[1]] = part
        return coeff

    def digests_of(self, spec: SteeringSpec) -> str:
        """The digests of the sets a request uses: replacing a set changes its requests' prefix-cache key."""
        return "-".join(self.by_name[name].digest for name in sorted(spec.set_names(self.default.name)))

    # ---- what clients see -------------------------------------------------------------------------------
    @property
    def limits(self) -> SteeringLimits:
        if self._limits is None:
            sets = {name: self._set_limits(s.bank) for name, s in self.by_name.items()}
            self._limits = SteeringLimits(sets, self.num_model_layers, self.max_intensity, self.max_emotions,
                                          frozenset(self.busy))
        return self._limits

    def _set_limits(self, bank: EmotionBank) -> SetLimits:
        per_alpha = bank.dose_per_alpha()
        hooked = tuple(self.steered_layers(bank))
        if per_alpha is None:
            return SetLimits(tuple(bank.emotions), hooked=hooked)
        first, last = self.layer_range or (0, self.num_model_layers - 1)
        rows = [row for row, layer in enumerate(bank.layers) if first <= layer <= last]
        doses = []
        for e, emotion in enumerate(bank.emotions):
            raw = float(per_alpha[rows, e].max())
            calibrated = bank.scale(emotion) * (1.0 if bank.units == "dose" else raw)
            doses.append((emotion, abs(calibrated), raw))
        return SetLimits(tuple(bank.emotions), self.max_dose, tuple(doses), hooked)

    def describe(self) -> list[dict]:
        return [{"name": s.name, "emotions": s.bank.emotions, "layers": s.bank.layers, "units": s.bank.units,
                 "calibrated": dict(s.bank.calibration), "bands": dict(s.bank.bands), "digest": s.digest,
                 "source": s.source, "default": s is self.default} for s in self.by_name.values()]
