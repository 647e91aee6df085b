"""Import and export other vector formats.

* The paper's published JSON: one file per emotion, ``{"<layer>": [[H floats]]}``, taken at each layer's
  self-attention output (hook ``attn_out``). Files are named ``<model>_<emotion>.json``.
* llama.cpp / repeng GGUF control vectors: architecture ``controlvector``, one ``direction.<layer>`` tensor
  per layer, added to the output of (0-based) layer <layer> (hook ``residual``). One emotion per file.
  llama.cpp ignores layer 0, so it is left out on export.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

from .bank import BankError, EmotionBank

logger = logging.getLogger(__name__)
FORMATS = ("paper-json", "gguf")


def detect_format(path: Path) -> str:
    if path.is_dir():
        if any(path.glob("*.json")):
            return "paper-json"
        if any(path.glob("*.gguf")):
            return "gguf"
        raise BankError(f"{path}: no .json or .gguf files inside")
    if path.suffix == ".json":
        return "paper-json"
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            return "gguf"
    raise BankError(f"{path}: cannot tell the format; pass --format {'|'.join(FORMATS)}")


def _sources(paths: list[Path], suffix: str) -> list[Path]:
    files = []
    for path in paths:
        if not path.exists():
            raise BankError(f"{path}: no such file or folder")
        files += sorted(path.glob(f"*{suffix}")) if path.is_dir() else [path]
    if not files:
        raise BankError(f"no {suffix} files in {[str(p) for p in paths]}")
    return files


def _emotion_from_name(path: Path) -> str:
    return re.split(r"[_\-.]", path.stem)[-1].lower()


def _assemble(per_emotion: dict[str, dict[int, np.ndarray]], hook: str, model: dict, recipe: dict) -> EmotionBank:
    layers = sorted(set().union(*[set(v) for v in per_emotion.values()]))
    sizes = {vec.shape[-1] for table in per_emotion.values() for vec in table.values()}
    if len(sizes) != 1:
        raise BankError(f"vectors disagree on hidden size: {sorted(sizes)}")
    hidden = sizes.pop()
    vectors = torch.zeros(len(layers), len(per_emotion), hidden)
    for e, table in enumerate(per_emotion.values()):
        for row, layer in enumerate(layers):
            if layer in table:
                vectors[row, e] = torch.from_numpy(np.asarray(table[layer], dtype=np.float32).reshape(hidden))
    return EmotionBank(vectors, list(per_emotion), hook, layers, {**model, "hidden_size": hidden}, recipe)


def import_paper_json(paths: list[Path], model: dict | None = None) -> EmotionBank:
    per_emotion = {}
    for path in _sources(paths, ".json"):
        try:
            data = json.loads(path.read_text())
            table = {int(k): np.asarray(v, dtype=np.float32) for k, v in data.items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise BankError(f"{path}: not a paper emotion-vector file ({exc})") from exc
        per_emotion[_emotion_from_name(path)] = table
    return _assemble(per_emotion, "attn_out", model or {}, {"source": "paper JSON", "files": [str(p) for p in paths]})


def import_gguf(paths: list[Path], emotions: list[str] | None = None, model: dict | None = None) -> EmotionBank:
    from gguf import GGUFReader

    files = _sources(paths, ".gguf")
    if emotions and len(emotions) != len(files):
        raise BankError(f"{len(files)} GGUF files but {len(emotions)} emotion names")
    per_emotion, hints = {}, []
    for i, path in enumerate(files):
        try:
            reader = GGUFReader(str(path))
        except Exception as exc:
            raise BankError(f"{path}: not a readable GGUF file ({exc})") from exc
        table = {}
        for tensor in reader.tensors:
            match = re.fullmatch(r"direction\.(\d+)", tensor.name)
            if match:
                table[int(match.group(1))] = np.array(tensor.data, dtype=np.float32)
        if not table:
            raise BankError(f"{path}: no direction.<layer> tensors; is it a control vector?")
        field = reader.fields.get("controlvector.model_hint")
        if field is not None:
            hints.append(bytes(field.parts[field.data[0]]).decode())
        per_emotion[(emotions[i] if emotions else _emotion_from_name(path)).lower()] = table
    recipe = {"source": "GGUF control vector", "files": [str(p) for p in files], "model_hint": hints}
    return _assemble(per_emotion, "residual", model or {}, recipe)


def export_gguf(bank: EmotionBank, out: Path, emotions: list[str] | None = None) -> list[Path]:
    """One GGUF control vector per emotion: OUT itself for one emotion, else OUT-<emotion>.gguf."""
    from gguf import GGUFWriter

    if bank.hook != "residual":
        raise BankError(
            f"llama.cpp control vectors are added to each layer's output (hook 'residual'); this bank's hook "
            f"is {bank.hook!r}, so its vectors would act differently there. Extract with --hook residual."
        )
    emotions = emotions or bank.emotions
    unknown = [e for e in emotions if e not in bank.emotions]
    if unknown:
        raise BankError(f"unknown emotion(s) {unknown}; this bank has {bank.emotions}")
    if 0 in bank.layers:
        logger.warning("emosteer: llama.cpp ignores direction.0; layer 0 is left out of the GGUF export")
    written = []
    for emotion in emotions:
        path = out if len(emotions) == 1 else out.with_name(f"{out.stem}-{emotion}.gguf")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        writer = GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", bank.model.get("name") or bank.model.get("architecture") or "")
        writer.add_uint32("controlvector.layer_count", len([x for x in bank.layers if x > 0]))
        e = bank.emotions.index(emotion)
        for row, layer in enumerate(bank.layers):
            if layer > 0:
                writer.add_tensor(f"direction.{layer}", bank.vectors[row, e].numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
        written.append(path)
    return written
