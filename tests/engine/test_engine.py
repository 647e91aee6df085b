"""Steering inside the real vLLM CPU engine (tiny Llama, fp32, eager, chunked prefill at 64 tokens): the offset is
exact on the steered positions across chunks; other requests' specs never matter; a mixed batch equals one request
at a time; results never depend on the prefix cache (warm == cold, a steered chat's next turn, a forged salt never
shares steered KV, unsteered traffic shares a steered request's unsteered prefix); aborted and finished requests
leave nothing behind, in the workers and in the front-end; bad input and streaming-input sessions are refused
while the engine keeps serving."""

import pickle

import numpy as np
import probes
import pytest
import torch
from engine_helpers import params, prompt, tiny_llm, tokens_and_logprobs
from vllm.inputs import TokensPrompt

from vllm_emosteer import steer
from vllm_emosteer.vectors.bank import EmotionBank

EMOTIONS = ["joy", "anger", "disgust", "fear", "sadness"]


@pytest.fixture(scope="module")
def llm(tiny_llama, tiny_bank_path):
    engine = tiny_llm(tiny_llama, tiny_bank_path)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def bank(tiny_bank_path):
    return EmotionBank.load(tiny_bank_path)


def expected_offset(bank, layer, intensities):
    return sum(v * bank.vectors[layer, EMOTIONS.index(e)].double() for e, v in intensities.items())


@pytest.mark.parametrize(
    "spec, positions, layers",
    [
        ({"joy": 1.0, "fear": -0.5}, "response", None),
        ({"anger": 0.7}, "all", (1, 2)),
    ],
)
def test_offset_is_exact_on_steered_positions_across_chunks(llm, bank, spec, positions, layers):
    prompt_len = 150  # > max_num_batched_tokens: prefill runs in chunks
    llm.apply_model(probes.install_capture)
    try:
        llm.generate(prompt(prompt_len, 1), params(steer(positions=positions, layers=layers, **spec), max_tokens=4))
        captures = [c for worker in llm.apply_model(probes.take_captures) for c in pickle.loads(worker)]
    finally:
        llm.apply_model(probes.remove_capture)
    first, last = layers or (0, 3)
    starts = sorted({int(pos[0]) for layer, pos, _, _ in captures if layer == 0})
    assert 0 < starts[1] < prompt_len - 1, f"prefill was not chunked: {starts}"
    seen_steered = seen_plain = 0
    for layer, pos, before, after in captures:
        delta = (after - before).double()
        first_steered = prompt_len - 1 if positions == "response" else 0
        steered = (pos >= first_steered) & torch.tensor(first <= layer <= last)
        if steered.any():
            offset = expected_offset(bank, layer, spec)
            torch.testing.assert_close(delta[steered], offset.expand(int(steered.sum()), -1), rtol=0, atol=2e-5)
            seen_steered += int(steered.sum())
        assert torch.equal(after[~steered], before[~steered]), f"unsteered tokens changed at layer {layer}"
        seen_plain += int((~steered).sum())
    # response mode: the last prompt token + 3 decode inputs, at 4 layers; all mode: every token at 2 layers
    assert seen_steered == (4 * 4 if positions == "response" else (prompt_len + 3) * 2)
    assert seen_plain > 0


def test_isolation_other_requests_specs_never_matter(llm):
    prompts = [prompt(20, s) for s in (11, 12, 13)]
    first = llm.generate(prompts, [params(steer(joy=1.5)), params(), params(steer(fear=0.8, positions="all"))])
    second = llm.generate(prompts, [params(steer(joy=1.5)), params(steer(anger=2.0, sadness=-1)), params()])
    assert tokens_and_logprobs(first[0]) == tokens_and_logprobs(second[0])
    # B alone unsteered in the first batch equals a lone unsteered run of B
    alone = llm.generate([prompts[1]], [params()])
    assert tokens_and_logprobs(first[1]) == tokens_and_logprobs(alone[0])
    # steering does something
    assert tokens_and_logprobs(first[1]) != tokens_and_logprobs(second[1])
    assert tokens_and_logprobs(first[2]) != tokens_and_logprobs(second[2])


def test_mixed_batch_equals_one_request_at_a_time(llm):
    specs = [steer(joy=1.0), None, steer(anger=0.5, disgust=0.5), steer(sadness=2.0, layers=(2, 3)),
             steer(fear=-1.0, positions="all")]
    prompts = [prompt(10 + 7 * i, 20 + i) for i in range(len(specs))]
    batched = llm.generate(prompts, [params(s) for s in specs])
    for p, s, b in zip(prompts, specs, batched):
        single = llm.generate([p], [params(s)])[0]
        ids_b, lp_b = tokens_and_logprobs(b)
        ids_s, lp_s = tokens_and_logprobs(single)
        assert ids_b == ids_s
        np.testing.assert_allclose(lp_b, lp_s, atol=1e-4)


def test_prefix_cache_never_mixes_specs(llm):
    shared = prompt(96, 40)  # three full blocks of 32
    plain = llm.generate([shared], [params()])[0]
    steered = llm.generate([shared], [params(steer(joy=1.0, positions="all"))])[0]
    assert steered.num_cached_tokens == 0, "a steered request read KV computed without steering"
    again = llm.generate([shared], [params(steer(joy=1.0, positions="all"))])[0]
    assert again.num_cached_tokens > 0, "requests with the same spec should share the prefix cache"
    plain_again = llm.generate([shared], [params()])[0]
    assert plain_again.num_cached_tokens > 0
    other = llm.generate([shared], [params(steer(joy=1.1, positions="all"))])[0]
    assert other.num_cached_tokens == 0
    llm.reset_prefix_cache()
    fresh = llm.generate([shared], [params(steer(joy=1.0, positions="all"))])[0]
    assert tokens_and_logprobs(steered) == tokens_and_logprobs(again) == tokens_and_logprobs(fresh)
    assert tokens_and_logprobs(plain) == tokens_and_logprobs(plain_again)
    # a user's own salt is kept and combined
    salted = llm.generate([dict(shared, cache_salt="tenant-a")], [params(steer(joy=1.0, positions="all"))])[0]
    assert salted.num_cached_tokens == 0


def test_abort_and_finish_leave_no_stale_state(llm):
    engine = llm.llm_engine
    for i in range(4):
        engine.add_request(f"abort-{i}", prompt(30, 60 + i), params(steer(anger=1.0 + i), max_tokens=50))
    for _ in range(3):
        engine.step()
    for i in range(4):
        engine.abort_request([f"abort-{i}"])
    reference = llm.generate([prompt(25, 70)], [params(steer(joy=0.5))])[0]
    held = llm.apply_model(probes.steering_state)
    assert not any(r.startswith("abort-") for state in held for r in state), held
    llm.reset_prefix_cache()
    assert tokens_and_logprobs(llm.generate([prompt(25, 70)], [params(steer(joy=0.5))])[0]) == \
        tokens_and_logprobs(reference)
    llm.generate([prompt(5, 1)], [params(max_tokens=1)])  # one more step: finished requests are released
    held = llm.apply_model(probes.steering_state)
    assert all(len(state) <= 1 for state in held), held
    from vllm_emosteer.engine.frontend.usage import usage

    assert usage.held() == 0, "the front-end still holds entries of aborted or finished requests"


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"emotion": "love", "intensity": 1.0}, "unknown emotion 'love'"),
        ({"emotion": "joy", "intensity": float("nan")}, "finite"),
        ({"emotion": "joy", "intensity": 100.0}, "allowed range"),
        ({"emotion": "joy", "intensity": "loud"}, "must be a number"),
        ({"emotion": "joy", "steer_layers": [0, 4]}, "0 <= first <= last < 4"),
        ({"emotion": "joy", "steer_positions": "everywhere"}, "unknown position mode"),
    ],
)
def test_bad_input_refused_before_scheduling_and_engine_keeps_serving(llm, extra, words):
    good = prompt(12, 90)
    with pytest.raises(ValueError, match=words):
        llm.generate([good, good], [params(steer(joy=1.0)), params(extra)])
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate([good], [params(steer(joy=1.0))])[0]
    assert len(out.outputs[0].token_ids) == 8


def test_next_turn_of_a_steered_chat_is_the_same_warm_or_cold(llm):
    """Response mode: KV before a request's last prompt token is the unsteered model's, and shared as such; from
    there on it is keyed by the spec and the position. The next turn of a chat (history + the steered answer + a
    new question) then reads the history unsteered, cold or warm alike."""
    spec = steer(joy=1.0, fear=0.5)
    first = prompt(70, 41)  # blocks of 32: [0, 64) lie before the first steered position (69)
    llm.reset_prefix_cache()
    answer = llm.generate([first], [params(spec, max_tokens=40)])[0]
    history = first["prompt_token_ids"] + list(answer.outputs[0].token_ids)
    next_turn = TokensPrompt(prompt_token_ids=history + prompt(30, 42)["prompt_token_ids"])
    warm = llm.generate([next_turn], [params(spec)])[0]
    again = llm.generate([next_turn], [params(spec)])[0]
    shared_prefix = TokensPrompt(prompt_token_ids=first["prompt_token_ids"] + prompt(10, 43)["prompt_token_ids"])
    plain = llm.generate([shared_prefix], [params()])[0]
    llm.reset_prefix_cache()
    cold = llm.generate([next_turn], [params(spec)])[0]
    plain_cold = llm.generate([shared_prefix], [params()])[0]
    assert tokens_and_logprobs(warm) == tokens_and_logprobs(cold) == tokens_and_logprobs(again)
    assert tokens_and_logprobs(plain) == tokens_and_logprobs(plain_cold)
    assert warm.num_cached_tokens == 64, "only the first turn's blocks before its steered position are shared"
    assert again.num_cached_tokens == 128, "a repeated turn reuses its own cache up to its last prompt token"
    assert plain.num_cached_tokens == 64, "unsteered traffic shares a prefix that steered traffic computed"
    assert cold.num_cached_tokens == 0 and plain_cold.num_cached_tokens == 64  # the cold turn's prefix, shared


def test_a_client_cache_salt_never_shares_steered_kv(llm):
    from vllm_emosteer.engine.prefix_cache import CACHE_KEY

    from vllm_emosteer.engine.options import frontend_options
    from vllm_emosteer.engine.spec import parse_steering

    shared = prompt(100, 44)
    extra = steer(joy=1.0, positions="all")
    sets = frontend_options(llm.llm_engine.input_processor).sets
    spec = parse_steering(extra, sets.limits)
    llm.reset_prefix_cache()
    steered = llm.generate([shared], [params(extra)])[0]
    # salts a client could build from what the server publishes (set digests) and the spec
    for forged in (f"emo-{sets.digests_of(spec)}-{spec.fingerprint()}", f"{sets.digests_of(spec)}-{spec.fingerprint()}"):
        out = llm.generate([dict(shared, cache_salt=forged)], [params()])[0]
        assert out.num_cached_tokens == 0
        back = llm.generate([dict(shared, cache_salt=forged)], [params(extra)])[0]
        assert back.num_cached_tokens == 0 and tokens_and_logprobs(back) == tokens_and_logprobs(steered)
    with pytest.raises(ValueError, match="reserved"):
        llm.generate([shared], [params({CACHE_KEY: ["x", "all"], "emotion": "joy"})])
    with pytest.raises(ValueError, match="reserved"):
        llm.generate([shared], [params({CACHE_KEY: ["x", "all"]})])


def test_finished_requests_leave_nothing_in_the_front_end(llm):
    from vllm_emosteer.engine.frontend.usage import usage

    llm.generate([prompt(12, 500 + i) for i in range(100)],
                 [params(steer(joy=0.1 * (i % 7 + 1)), max_tokens=2, logprobs=None) for i in range(100)])
    assert usage.held() == 0


def test_streaming_input_sessions_are_refused_when_steered(llm):
    processor = llm.llm_engine.input_processor
    with pytest.raises(ValueError, match="streaming-input sessions"):
        processor.process_inputs("stream-1", prompt(10, 1), params(steer(joy=1.0)), supported_tasks=("generate",),
                                 resumable=True)
    request = processor.process_inputs("stream-2", prompt(10, 1), params(), supported_tasks=("generate",),
                                       resumable=True)
    assert request.resumable
