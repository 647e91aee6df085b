"""vLLM features a deployment turns on, with steering (the compatibility table in docs/design.md names these
tests): n > 1 parallel sampling steers every child, reproducibly; structured output keeps its constraint under
steering; prompt logprobs of a steered request are the same with the prefix cache warm or cold."""

import pytest
from conftest import RUNNER
from engine_helpers import prompt, tiny_llm
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

from vllm_emosteer import steer

JOY = steer(joy=2.0, positions="all")


@pytest.fixture(scope="module")
def llm(tiny_llama, tiny_bank_path):
    engine = tiny_llm(tiny_llama, tiny_bank_path, enable_prefix_caching=True)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def children(llm, extra):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True, extra_args=extra)
    return [list(c.token_ids) for c in llm.generate(prompt(20, 7), params)[0].outputs]


def test_parallel_sampling_steers_every_child_reproducibly(llm):
    steered, plain = children(llm, JOY), children(llm, None)
    assert steered == children(llm, JOY)  # reproducible: the same seed, the same children
    assert len(steered) == 3 and all(s != p for s, p in zip(steered, plain))  # each child steered


def test_structured_output_holds_under_steering(llm):
    choices = ["happy", "sad", "angry"]
    params = [SamplingParams(max_tokens=8, temperature=0, extra_args=extra,
                             structured_outputs=StructuredOutputsParams(choice=choices)) for extra in (JOY, None)]
    outputs = llm.generate([prompt(12, 3)] * 2, params)
    assert all(o.outputs[0].text in choices for o in outputs), [o.outputs[0].text for o in outputs]


def test_prompt_logprobs_of_a_steered_request_are_the_same_warm_or_cold(llm):
    def prompt_logprobs():
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, extra_args=JOY)
        out = llm.generate(prompt(70, 9), params)[0]
        return [None if lp is None else {k: v.logprob for k, v in lp.items()} for lp in out.prompt_logprobs]

    llm.reset_prefix_cache()
    cold = prompt_logprobs()
    warm = prompt_logprobs()  # its blocks are cached now
    plain = llm.generate(prompt(70, 9), SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    assert warm == cold
    assert cold[5] != {k: v.logprob for k, v in plain.prompt_logprobs[5].items()}  # "all" steers the prompt too
