"""Shared fixtures: tiny local models (no hub), their vectors, and the default model.

Tests by topic: unit/ (no engine), engine/ (the real vLLM CPU engine; the command line, in subprocesses), server/
(a real `vllm-emosteer serve`: HTTP, the browser). Tests under engine/ and server/ carry the marker `engine`:
`pytest -m "not engine" tests` is the engine-free lane. Engines are expensive on 2 cores: each test module shares one engine (module-scoped fixtures)."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
TRITON_CPU = TESTS / "triton_cpu"  # Model Runner V2 through Triton's interpreter (triton_cpu/standin.py)
# Engine workers are spawned processes; they must import tests/probes.py and run probe functions, and start the
# Triton stand-in when they run Model Runner V2.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), str(TRITON_CPU), os.environ.get("PYTHONPATH")]))
sys.path[:0] = [str(TESTS), str(TRITON_CPU)]
# Which vLLM model runner every engine of this session uses: v1 (the default) or v2 (Model Runner V2, through
# Triton's interpreter on this CPU machine). One per session: vLLM reads the choice in every process.
RUNNER = os.environ.get("EMOSTEER_TEST_RUNNER", "v1")
if RUNNER not in ("v1", "v2"):
    raise ValueError(f"EMOSTEER_TEST_RUNNER must be v1 or v2, not {RUNNER!r}")
os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if RUNNER == "v2" else "0"
if RUNNER == "v2":
    os.environ["TRITON_INTERPRET"] = "1"
    import standin

    standin.install()
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ENGINE_FOLDERS = ("engine", "server")


def pytest_report_header(config):
    return f"emosteer: {'Model Runner V2 (Triton interpreter)' if RUNNER == 'v2' else 'V1 model runner'}"


def pytest_configure(config):
    config.addinivalue_line("markers", "engine: starts the real vLLM engine or server (tests/engine, tests/server)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(item.path).parent.name in ENGINE_FOLDERS and Path(item.path).parent.parent == TESTS:
            item.add_marker(pytest.mark.engine)


TINY_HIDDEN = 128
TINY_LAYERS = 4
EMOTIONS = ["joy", "anger", "disgust", "fear", "sadness"]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from vllm_emosteer.default_model import model_path

    return model_path()


def _tiny_config(arch: str):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(hidden_size=TINY_HIDDEN, intermediate_size=256, num_hidden_layers=TINY_LAYERS,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=49152,
                  max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                  tie_word_embeddings=True)
    if arch == "LlamaForCausalLM":
        return LlamaConfig(**common)
    if arch == "Qwen2ForCausalLM":
        return Qwen2Config(**common)
    if arch == "Gemma3ForCausalLM":
        return Gemma3TextConfig(**common, sliding_window=64, query_pre_attn_scalar=64)
    raise ValueError(arch)


def make_tiny_model(folder: Path, arch: str, tokenizer_dir: Path, seed: int = 0, config=None) -> Path:
    """A random-weight model of `arch` (from `config`, or the fixtures' own) with the default model's tokenizer,
    saved as an HF folder."""
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    config = config or _tiny_config(arch)
    config.architectures = [arch]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so that tokens vary with the input
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def make_tiny_bank(model_dir: Path, out: Path, hook: str = "attn_out", scale: float = 0.5, seed: int = 1):
    from transformers import AutoConfig

    from vllm_emosteer.vectors.bank import EmotionBank, model_facts

    config = AutoConfig.from_pretrained(model_dir)
    layers = config.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(layers, len(EMOTIONS), config.hidden_size, generator=g) * scale
    bank = EmotionBank(vectors, EMOTIONS, hook, list(range(layers)), model_facts(config, "tiny"))
    bank.save(out)
    return bank


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, default_model_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "LlamaForCausalLM", default_model_dir)


@pytest.fixture(scope="session")
def tiny_bank_path(tmp_path_factory, tiny_llama) -> Path:
    path = tmp_path_factory.mktemp("banks") / "tiny.safetensors"
    make_tiny_bank(tiny_llama, path)
    return path
