"""alpha = 0 or no spec is bit-identical to an engine without the plugin, eager and compiled (the compiled CPU
graphs run the add in every hooked layer, as plain torch ops that Inductor fuses with the layer's own); eager equals
compiled; steering survives preemption and recompute."""

import os

import numpy as np
import pytest
from engine_helpers import params, prompt, shutdown, tiny_llm, tokens_and_logprobs

from vllm_emosteer import steer

PROMPTS = [prompt(20 + 9 * i, 100 + i) for i in range(4)]
MIXED = [steer(joy=1.2), None, steer(anger=0.6, fear=0.6, positions="all"), steer(sadness=1.5, layers=(1, 2))]
ZERO = [steer(joy=0.0), None, {"emotion": "fear", "intensity": 0}, steer(anger=0.0, positions="all")]


def run(llm, specs, max_tokens=8):
    return [tokens_and_logprobs(o) for o in llm.generate(PROMPTS, [params(s, max_tokens) for s in specs])]


def results_without_plugin(tiny_llama, **overrides):
    os.environ["VLLM_PLUGINS"] = "none-such-plugin"  # an allowlist naming nothing: workers load no plugin
    try:
        llm = tiny_llm(tiny_llama, emosteer=False, **overrides)
    finally:
        del os.environ["VLLM_PLUGINS"]
    results = run(llm, [None] * 4)
    shutdown(llm)
    return results


@pytest.fixture(scope="module")
def without_plugin(tiny_llama):
    return results_without_plugin(tiny_llama)


@pytest.fixture(scope="module")
def compiled(tiny_llama, tiny_bank_path):
    """The compiled engine's results: ZERO, then MIXED (the order the eager engine sees them in)."""
    llm = tiny_llm(tiny_llama, tiny_bank_path, enforce_eager=False)
    try:
        return {"zero": run(llm, ZERO), "mixed": run(llm, MIXED)}
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def eager(tiny_llama, tiny_bank_path):
    llm = tiny_llm(tiny_llama, tiny_bank_path)
    yield llm
    shutdown(llm)


def test_zero_and_no_spec_are_bit_identical_to_no_plugin(eager, without_plugin):
    assert run(eager, ZERO) == without_plugin


def test_compiled_zero_and_no_spec_are_bit_identical_to_compiled_no_plugin(tiny_llama, compiled):
    assert compiled["zero"] == results_without_plugin(tiny_llama, enforce_eager=False)


def test_compiled_equals_eager(eager, compiled):
    expected = run(eager, MIXED)
    got = compiled["mixed"]
    for (ids_e, lp_e), (ids_c, lp_c) in zip(expected, got):
        assert ids_e == ids_c
        np.testing.assert_allclose(lp_e, lp_c, atol=1e-3)
    assert expected[0] != expected[1]


def test_steering_survives_preemption_and_recompute(tiny_llama, tiny_bank_path, eager):
    expected = run(eager, MIXED, max_tokens=60)
    # 6 blocks of 32 tokens cannot hold four requests of up to 110 tokens: the scheduler preempts and recomputes
    llm = tiny_llm(tiny_llama, tiny_bank_path, num_gpu_blocks_override=6, max_model_len=128,
                   disable_log_stats=False)
    try:
        got = llm.generate(PROMPTS, [params(s, 60) for s in MIXED])
        stats = llm.get_metrics()
    finally:
        shutdown(llm)
    preemptions = [m for m in stats if m.name == "vllm:num_preemptions"]
    assert preemptions and preemptions[0].value > 0, "the scenario did not preempt"
    for (ids_e, lp_e), out in zip(expected, got):
        ids, lp = tokens_and_logprobs(out)
        assert ids == ids_e
        np.testing.assert_allclose(lp, lp_e, atol=1e-3)
