"""What the CUDA path depends on, checked on CPU (issue 10): the GPU benchmark's whole path runs here first
(--smoke, without vLLM and without the installed package); the compile cache key follows the vectors file's
contents; the device tensors are model buffers (sleep mode level 2), written in place, through a rotating host
buffer per step (async scheduling); naive mode refuses CUDA graphs; the eager host plan equals the op."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import EMOTIONS, TINY_HIDDEN, TINY_LAYERS, make_tiny_bank
from engine_helpers import params, prompt, shutdown, tiny_llm

from vllm_emosteer import steer

ROOT = Path(__file__).resolve().parents[2]

# The GPU machine has PyTorch, Triton and transformers but neither vLLM nor this package installed.
WITHOUT_VLLM = textwrap.dedent("""
    import importlib.abc, runpy, sys

    class NoVllm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "vllm" or name.startswith("vllm."):
                raise ImportError("no vLLM on this machine: " + name)
            return None

    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # not installed either
    sys.meta_path.insert(0, NoVllm())
    sys.path[:] = [p for p in sys.path if p not in ("", ROOT)]
    sys.argv = ["benchmarks/kernel.py", "--smoke", "--sweep"]
    runpy.run_path(ROOT + "/benchmarks/kernel.py", run_name="__main__")
    assert not [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]
""")


def test_kernel_benchmark_smoke_runs_without_vllm():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        import triton  # noqa: F401

        env["TRITON_INTERPRET"] = "1"  # the Triton kernels and the sweep run too, in the interpreter
    except ImportError:
        pass
    result = subprocess.run([sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + WITHOUT_VLLM], cwd="/",
                            capture_output=True, text=True, timeout=600, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "all checks OK" in result.stdout, out[-4000:]
    assert "check_model" not in out and "FAIL" not in out, out[-4000:]
    if "TRITON_INTERPRET" in env:
        assert "sweep H=64 T=40" in result.stdout, out[-4000:]


def _config_hash(model_dir, vectors):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(model_dir), dtype="float32", max_model_len=256,
                      additional_config={"emosteer": {"vectors": str(vectors)}})
    return args.create_engine_config().compute_hash()


def test_compile_cache_key_follows_the_vectors_file_contents(tiny_llama, tmp_path):
    """Same path, other contents (vectors, hook) => another config hash, so no compiled graph is reused."""
    path = tmp_path / "v.safetensors"
    make_tiny_bank(tiny_llama, path, seed=1)
    first = _config_hash(tiny_llama, path)
    assert _config_hash(tiny_llama, path) == first  # stable
    make_tiny_bank(tiny_llama, path, seed=2)
    os.utime(path, (1_000_000_000, 1_000_000_000))  # a new mtime even within the same second
    second = _config_hash(tiny_llama, path)
    make_tiny_bank(tiny_llama, path, seed=2, hook="residual")
    os.utime(path, (1_000_000_100, 1_000_000_100))
    third = _config_hash(tiny_llama, path)
    assert len({first, second, third}) == 3


def test_worker_refuses_a_file_changed_after_start(tiny_llama, tmp_path):
    from vllm_emosteer.engine.options import DIGEST_KEY, EmosteerConfigError, options_from_vllm_config

    path = tmp_path / "v.safetensors"
    make_tiny_bank(tiny_llama, path)
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=256,
                        additional_config={"emosteer": {"vectors": str(path)}}).create_engine_config()
    assert DIGEST_KEY in config.additional_config["emosteer"]
    make_tiny_bank(tiny_llama, path, seed=7)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    with pytest.raises(EmosteerConfigError, match="changed after the engine started"):
        options_from_vllm_config(config)


def test_naive_mode_refuses_cuda_graphs(tiny_llama, tiny_bank_path):
    """Compilation off but CUDA graphs on (`-cc.mode=none`): a captured graph would freeze one step's loop.
    The CPU platform always turns CUDA graphs off, so the check runs on a config that has them."""
    from vllm.config import CUDAGraphMode

    from vllm_emosteer.engine.options import EmosteerConfigError, options_from_vllm_config
    from vllm_emosteer.engine.frontend.validation import check_engine_features as _check_engine_features

    vllm_config = SimpleNamespace(additional_config={"emosteer": {"vectors": str(tiny_bank_path), "mode": "naive"}},
                                  model_config=SimpleNamespace(hf_config=None, hf_text_config=None))
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(tiny_llama)
    vllm_config.model_config = SimpleNamespace(hf_config=hf, hf_text_config=hf, architectures=["LlamaForCausalLM"])
    options = options_from_vllm_config(vllm_config)
    for mode, cudagraphs, refused in ((0, CUDAGraphMode.FULL, True), (0, CUDAGraphMode.PIECEWISE, True),
                                      (3, CUDAGraphMode.NONE, True), (0, CUDAGraphMode.NONE, False)):
        config = SimpleNamespace(
            model_config=vllm_config.model_config, speculative_config=None,
            parallel_config=SimpleNamespace(enable_dbo=False, prefill_context_parallel_size=1),
            compilation_config=SimpleNamespace(mode=mode, cudagraph_mode=cudagraphs),
        )
        if refused:
            with pytest.raises(EmosteerConfigError, match="needs enforce_eager"):
                _check_engine_features(config, options)
        else:
            _check_engine_features(config, options)


# ---- inside the real CPU engine's worker (functions run there through LLM.apply_model) ----------------------
def buffer_names(model):
    runtime = model.emosteer_runtime
    buffers = dict(model.named_buffers())
    return {name: buffers[name].data_ptr() == tensor.data_ptr() for name, tensor in
            (("emosteer_bank", runtime.device_vectors), ("emosteer_rows", runtime.row_of_token.gpu),
             ("emosteer_coeff", runtime.coeff.gpu)) if name in buffers}


def test_device_tensors_are_model_buffers_and_never_reallocated(tiny_llama, tiny_bank_path):
    llm = tiny_llm(tiny_llama, tiny_bank_path)
    try:
        assert llm.apply_model(buffer_names) == [{"emosteer_bank": True, "emosteer_rows": True,
                                                  "emosteer_coeff": True}]
        specs = [steer(joy=1.0), None, steer(anger=0.5, positions="all")]
        llm.generate([prompt(70, i) for i in range(3)], [params(s) for s in specs])  # chunked prefill + decode
        assert llm.apply_model(buffer_names) == [{"emosteer_bank": True, "emosteer_rows": True,
                                                  "emosteer_coeff": True}]
    finally:
        shutdown(llm)


# ---- the eager host plan against the op ---------------------------------------------------------------------
@pytest.fixture
def runtime(monkeypatch):
    from vllm_emosteer.engine.worker import ops
    from vllm_emosteer.vectors.bank import EmotionBank

    monkeypatch.setattr(ops, "INTERPRETED", False)  # the CPU's own path (host plan), also in a Triton-interpreter session
    from vllm_emosteer.engine.options import EmosteerOptions
    from vllm_emosteer.engine.worker.runtime import SteeringRuntime
    from vllm_emosteer.engine.sets import VectorSets

    g = torch.Generator().manual_seed(3)
    bank = EmotionBank(torch.randn(TINY_LAYERS, len(EMOTIONS), TINY_HIDDEN, generator=g), EMOTIONS, "attn_out",
                       list(range(TINY_LAYERS)))
    sets = VectorSets({"emotions": (bank, "unused")}, 1, TINY_LAYERS, None, 8.0, len(EMOTIONS), 1.0)
    options = EmosteerOptions(sets, 8.0, len(EMOTIONS), None, "fused", TINY_LAYERS)
    rt = SteeringRuntime(options, max_tokens=64, max_slots=6, device=torch.device("cpu"))
    rt.host_plan = True
    return rt


def admitted(runtime, extra):
    """A request's extra_args as the engine core admits them: with the key the front-end gives (admission.py)."""
    from vllm_emosteer.engine.admission import expected_stamp
    from vllm_emosteer.engine.prefix_cache import CACHE_KEY

    return None if extra is None else {**extra, CACHE_KEY: expected_stamp(runtime.options, extra)}


JOY, MIX, SAD_LATE, FEAR_ALL = (steer(joy=1.5), steer(anger=0.7, fear=-1.2), steer(sadness=2.0, layers=(2, 3)),
                                steer(fear=0.9, positions="all"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "specs, prompts, tokens, computed, padding",
    [
        ([None, None], [3, 6], [3, 1], [0, 5], 0),  # nothing steered: skipped
        ([JOY], [5], [1], [9], 0),  # one client decoding: all steered, one slot
        ([JOY, MIX, SAD_LATE], [4, 2, 20], [1, 1, 1], [9, 3, 30], 2),  # decode batch, several slots, padded x
        ([JOY, None, FEAR_ALL], [5, 3, 30], [5, 3, 1], [0, 0, 40], 0),  # prefill (response: last prompt token)
        ([MIX], [6], [6], [0], 1),  # one slot, only the last prompt token steered
    ],
)
def test_host_plan_equals_the_op(runtime, dtype, specs, prompts, tokens, computed, padding):
    """Requests are admitted through the runtime (slots, coefficients, per-slot offsets), then every layer of the
    eager host plan must equal the op's general path on the same rows."""
    from vllm_emosteer.engine.worker.ops import steer_add_torch

    req_ids = [f"r{i}" for i in range(len(specs))]
    requests = {r: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=admitted(runtime, spec)),
                                   num_prompt_tokens=n) for r, spec, n in zip(req_ids, specs, prompts)}
    tokens, computed = np.array(tokens), np.array(computed)
    runtime.prepare(req_ids, requests, tokens, computed)
    total = int(tokens.sum())
    x = (torch.randn(total + padding, TINY_HIDDEN) * 3).to(dtype)
    expected, original = x.clone(), x.clone()
    for layer in range(TINY_LAYERS):
        steer_add_torch(expected, runtime.row_of_token.gpu, runtime.coeff.gpu, runtime.device_vectors, layer)
        runtime.steer_eager(x, layer)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(x, expected, rtol=tol, atol=tol)
    nothing = all(s is None for s in specs)
    assert (runtime.plan.steered == 0) == nothing
    assert torch.equal(x, original) == nothing
    assert torch.equal(x[total:], original[total:])  # padding is never steered


def test_uploads_rotate_host_buffers_and_write_the_device_tensors_in_place(runtime, monkeypatch):
    """The CUDA layout (separate device tensors, uploads through vLLM's UvaBufferPool), on CPU tensors: step N+1's
    rows are written into another host buffer than step N's (whose copy may still be in flight), and always into
    the same device tensors."""
    from vllm.v1.worker.cpu import buffer_utils as cpu_buffers
    from vllm.v1.worker.gpu import buffer_utils
    from vllm.v1.worker.gpu.buffer_utils import UvaBufferPool

    monkeypatch.setattr(buffer_utils, "UvaBuffer", cpu_buffers.UvaBuffer)  # as vLLM's CPU runner does (no pinning)

    rows, coeff = torch.full_like(runtime.row_of_token.cpu, -7), torch.zeros_like(runtime.coeff.cpu)
    runtime.row_of_token.gpu, runtime.coeff.gpu = rows, coeff
    runtime.uploads = {"rows": UvaBufferPool(rows.shape[0], torch.int32, 2),
                       "coeff": UvaBufferPool(tuple(coeff.shape), torch.float32, 2)}
    requests = {r: SimpleNamespace(sampling_params=SimpleNamespace(extra_args=admitted(runtime, spec)),
                                   num_prompt_tokens=4) for r, spec in (("a", JOY), ("b", None), ("c", FEAR_ALL))}
    hosts, seen = [], []
    for step, tokens in enumerate(([4, 4, 4], [1, 1, 1], [1, 1, 1])):
        runtime.prepare(["a", "b", "c"], requests, np.array(tokens), np.array([0, 0, 0]) + 4 * (step > 0) + step)
        total = sum(tokens)
        assert torch.equal(rows[:total], torch.from_numpy(runtime.row_of_token.np[:total]))
        assert rows.data_ptr() == runtime.row_of_token.gpu.data_ptr()
        hosts.append(runtime.uploads["rows"]._uva_bufs[runtime.uploads["rows"]._curr].cpu.data_ptr())
        seen.append(rows[:12].tolist())
    assert hosts[0] != hosts[1] and hosts[1] != hosts[2]
    assert torch.equal(coeff, runtime.coeff.cpu) and coeff.abs().sum() > 0
    assert seen[0] == [-1, -1, -1, 0, -1, -1, -1, -1, 1, 1, 1, 1]  # prefill: a's last prompt token, all of c
    assert seen[2] == [0, -1, 1] + [-1] * 9  # decode: the prefill's rows are cleared


def test_a_worker_never_steers_a_request_otherwise_than_it_is_keyed(runtime):
    """The worker's half of admission.py: steering fields without the key, or with another request's key, stop the
    step (the engine core admits neither, so this is the last line, not a path)."""
    from vllm_emosteer.engine.prefix_cache import CACHE_KEY

    for extra in (JOY, {**JOY, CACHE_KEY: admitted(runtime, MIX)[CACHE_KEY]}):
        requests = {"r": SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra), num_prompt_tokens=4)}
        with pytest.raises(RuntimeError, match="cannot be steered as the engine core admitted it"):
            runtime.prepare(["r"], requests, np.array([4]), np.array([0]))
        runtime.forget(["r"])
