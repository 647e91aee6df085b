"""One decider for what a request's steering is (engine/admission.py): a request that reaches the engine core without
passing the plugin's front-end (a pre-built EngineCoreRequest handed to LLMEngine.add_request, as vLLM allows) is
served only if its prefix-cache key is the one its steering fields give under the engine's sets. Missing or forged,
the request fails on its own and the engine keeps serving; a genuine one is steered exactly as through the front-end.
"""

import time

import pytest
from engine_helpers import params, prompt, tiny_llm, tokens_and_logprobs
from vllm.v1.engine import EngineCoreRequest

from vllm_emosteer import steer
from vllm_emosteer.engine.prefix_cache import CACHE_KEY

JOY = steer(joy=2.0, positions="all")
SAD = steer(sadness=2.0, positions="all")


@pytest.fixture(scope="module")
def llm(tiny_llama, tiny_bank_path):
    engine = tiny_llm(tiny_llama, tiny_bank_path, enable_prefix_caching=True)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def pre_built(request_id, tokens, extra):
    """An EngineCoreRequest made by hand: what a client of LLMEngine.add_request may pass instead of a prompt."""
    sampling = params(extra)
    sampling.output_kind = 2  # RequestOutputKind.FINAL_ONLY
    return EngineCoreRequest(request_id=request_id, prompt_token_ids=list(tokens["prompt_token_ids"]),
                             mm_features=None, sampling_params=sampling, pooling_params=None,
                             arrival_time=time.time(), lora_request=None, cache_salt=None, data_parallel_rank=None)


def stamped(llm, request_id, tokens, extra):
    """The request as the front-end makes it, key included."""
    engine = llm.llm_engine
    return engine.input_processor.process_inputs(request_id, tokens, params(extra),
                                                 supported_tasks=engine.get_supported_tasks())


def run(llm, request):
    engine = llm.llm_engine
    engine.add_request(request.request_id, request, request.sampling_params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    [output] = outputs
    return output


def test_steering_fields_without_the_front_end_key_are_refused(llm):
    output = run(llm, pre_built("unkeyed", prompt(20, 1), JOY))
    assert output.outputs[0].finish_reason == "error" and not output.outputs[0].token_ids
    steers_nothing = run(llm, pre_built("zero", prompt(20, 1), steer(joy=0.0)))  # no key is due: served
    assert steers_nothing.outputs[0].finish_reason == "length"


def test_a_forged_or_borrowed_key_is_refused(llm):
    borrowed = stamped(llm, "sad", prompt(20, 2), SAD).sampling_params.extra_args[CACHE_KEY]
    for request_id, key in (("borrowed", borrowed), ("forged", ["0" * 40, "all"]), ("odd", 7)):
        output = run(llm, pre_built(request_id, prompt(20, 2), dict(JOY, **{CACHE_KEY: key})))
        assert output.outputs[0].finish_reason == "error", request_id
    unsteered_with_key = run(llm, pre_built("unsteered-key", prompt(20, 2), {CACHE_KEY: borrowed}))
    assert unsteered_with_key.outputs[0].finish_reason == "error"


def test_the_engine_keeps_serving_and_a_genuine_pre_built_request_is_steered_as_usual(llm):
    run(llm, pre_built("unkeyed-again", prompt(20, 3), JOY))
    through_front_end = tokens_and_logprobs(llm.generate([prompt(20, 3)], [params(JOY)], use_tqdm=False)[0])
    genuine = tokens_and_logprobs(run(llm, stamped(llm, "genuine", prompt(20, 3), JOY)))
    plain = tokens_and_logprobs(llm.generate([prompt(20, 3)], [params(None)], use_tqdm=False)[0])
    assert genuine == through_front_end and genuine[0] != plain[0]


def test_the_rust_front_end_is_refused_at_start(tiny_llama, tiny_bank_path, monkeypatch):
    monkeypatch.setenv("VLLM_USE_RUST_FRONTEND", "1")
    with pytest.raises(ValueError, match="the Rust front-end"):
        tiny_llm(tiny_llama, tiny_bank_path)
