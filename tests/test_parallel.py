"""Steering under vLLM's distributed execution on CPU: tensor parallel 2 and pipeline parallel 2 (multiprocessing
executor) equal one process; the plugin inside a Ray actor (vLLM's CPU platform has no Ray executor)."""

import os

import pytest
from engine_helpers import params, prompt, shutdown, tiny_llm

from vllm_emosteer import load_set, steer
from vllm_emosteer.engine.updates import ALLOW_ENV

SPECS = [None, steer(joy=1.0), steer(anger=0.5, fear=0.5, positions="all"), steer(sadness=1.5, layers=(2, 3))]
PROMPTS = [prompt(18 + 5 * i, 300 + i) for i in range(len(SPECS))]


def generate(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, [params(s, logprobs=None) for s in SPECS])]


@pytest.fixture(scope="module")
def single(tiny_llama, tiny_bank_path):
    llm = tiny_llm(tiny_llama, tiny_bank_path)
    outputs = generate(llm)
    shutdown(llm)
    assert outputs[0] != outputs[1]
    return outputs


def generate_with_a_runtime_set(llm, bank_path, monkeypatch):
    """Load the same vectors again as another set (an RPC to every rank) and steer with it."""
    monkeypatch.setenv(ALLOW_ENV, "1")
    load_set(llm, "again", bank_path.name)
    specs = [s if s is None else {"emosteer": dict(s["emosteer"], set="again")} for s in SPECS]
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, [params(s, logprobs=None) for s in specs])]


def with_room(bank_path):
    return {"max_sets": 2, "sets_dir": str(bank_path.parent)}


@pytest.fixture
def two_cpu_workers(monkeypatch):
    # vLLM's CPU workers bind OpenMP threads to NUMA nodes; with one node, bind one core each by hand
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    return monkeypatch


def test_tensor_parallel_2_equals_single_process(tiny_llama, tiny_bank_path, single, two_cpu_workers):
    llm = tiny_llm(tiny_llama, tiny_bank_path, options=with_room(tiny_bank_path), tensor_parallel_size=2,
                   distributed_executor_backend="mp")
    try:
        assert generate(llm) == single
        assert generate_with_a_runtime_set(llm, tiny_bank_path, two_cpu_workers) == single
    finally:
        shutdown(llm)


def test_pipeline_parallel_2_equals_single_process(tiny_llama, tiny_bank_path, single, two_cpu_workers):
    # each rank hooks only its own layers; eager PP fails in vLLM 0.32's CPU runner without the plugin too
    # (intermediate tensors are allocated by the compile warm-up), so this runs compiled
    llm = tiny_llm(tiny_llama, tiny_bank_path, options=with_room(tiny_bank_path), pipeline_parallel_size=2,
                   distributed_executor_backend="mp", enforce_eager=False)
    try:
        assert generate(llm) == single
        # compiled graphs read the bank in place: a set loaded after compilation steers them too
        assert generate_with_a_runtime_set(llm, tiny_bank_path, two_cpu_workers) == single
    finally:
        shutdown(llm)


def test_plugin_inside_a_ray_actor(tiny_llama, tiny_bank_path, single):
    ray = pytest.importorskip("ray")
    started_here = not ray.is_initialized()
    if started_here:  # .ci/run starts a local Ray instance (RAY_ADDRESS); without one, start one here
        env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k in ("PYTHONPATH", "HF_HUB_OFFLINE")}
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address or None, num_cpus=None if address else 2, include_dashboard=False,
                 runtime_env={"env_vars": env})

    @ray.remote(num_cpus=1)
    class SteeredEngine:
        def __init__(self, model, vectors):
            self.llm = tiny_llm(model, vectors)

        def generate(self):
            return generate(self.llm)

    try:
        actor = SteeredEngine.remote(str(tiny_llama), str(tiny_bank_path))
        assert ray.get(actor.generate.remote(), timeout=600) == single
        ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()
