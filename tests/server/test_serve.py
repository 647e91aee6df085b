"""`vllm serve` with emotions: a real server subprocess on the default model, the real `openai` client: discovery,
steered chat and completions (streaming equals non-streaming), 400s that name the field before any stream event,
beam search with steering refused, steer_raw over HTTP, prefix-cache safety and a steered chat's next turn equal
on a warm server and on one without prefix caching, start-up errors in one line."""

import asyncio
import random

import openai
import pytest
import requests
from conftest import RUNNER
from server_helpers import Server

QUESTION = [{"role": "user", "content": "Tell me about your day."}]
SMALL_BLOCKS = ("--block-size", "32", "--dtype", "float32")  # a chat turn's steered positions fill whole blocks; fp32: warm == cold


@pytest.fixture(scope="module")
def server(default_model_dir):
    srv = Server(default_model_dir, *SMALL_BLOCKS, "--enable-prompt-tokens-details")
    yield srv
    srv.stop()


def chat(client, xargs=None, messages=QUESTION, max_tokens=16, **kwargs):
    extra = {"vllm_xargs": xargs} if xargs else None
    return client.chat.completions.create(model="smol", messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body=extra, **kwargs)


def test_discovery_endpoint(server):
    info = requests.get(server.url + "/v1/emosteer", timeout=10).json()
    assert info["enabled"] and info["emotions"] == ["joy", "anger", "disgust", "fear", "sadness"]
    assert info["num_model_layers"] == 30 and info["max_intensity"] == 8.0 and info["hook"] == "attn_out"


def test_runtime_set_changes_are_off_unless_the_operator_turns_them_on(server):
    response = requests.post(server.url + "/v1/emosteer/sets", json={"name": "x", "file": "x.safetensors"}, timeout=30)
    assert response.status_code == 403 and "VLLM_EMOSTEER_ALLOW_RUNTIME_UPDATES=1" in response.json()["error"]["message"]
    assert requests.delete(server.url + "/v1/emosteer/sets/emotions", timeout=30).status_code == 403


def test_steered_chat_completion_and_stream_agree(server):
    client = server.client()
    plain = chat(client).choices[0].message.content
    steered = chat(client, {"emotions": ["sadness", "fear"], "intensities": [1.5, 0.5]}).choices[0].message.content
    assert steered != plain
    stream = chat(client, {"emotions": ["sadness", "fear"], "intensities": [1.5, 0.5]}, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == steered
    completion = client.completions.create(model="smol", prompt="My day was", max_tokens=12, temperature=0,
                                           extra_body={"vllm_xargs": {"emotion": "joy", "intensity": 2.0}})
    assert completion.choices[0].text


@pytest.mark.parametrize(
    "xargs, param, words",
    [
        ({"emotion": "love", "intensity": 1.0}, "emotion", "this server knows ['joy', 'anger'"),
        ({"emotion": "joy", "intensity": 50}, "intensity", "allowed range [-8.0, 8.0]"),
        ({"emotions": ["joy"], "intensities": [1.0, 2.0]}, "intensities", "has 2"),
        ({"emotion": "joy", "steer_layers": [3, 40]}, "steer_layers", "< 30"),
        ({"emotion": "joy", "steer_positions": "middle"}, "steer_positions", "['response', 'all']"),
    ],
)
def test_invalid_steering_gets_400_naming_the_field(server, xargs, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        chat(server.client(), xargs)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == param and words in error["message"]


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
@pytest.mark.parametrize("xargs, param", [({"emotion": "love", "intensity": 1.0}, "emotion"),
                                          ({"Emotion": "joy"}, "Emotion"),
                                          ({"steer_layers": [1, 2]}, "steer_layers")])
def test_streaming_with_bad_steering_gets_400_before_any_event(server, endpoint, xargs, param):
    body = {"model": "smol", "max_tokens": 8, "stream": True, "vllm_xargs": xargs}
    body.update({"messages": QUESTION} if endpoint == "chat/completions" else {"prompt": "My day was"})
    reply = requests.post(f"{server.url}/v1/{endpoint}", json=body, timeout=60)
    assert reply.status_code == 400, reply.text[:300]
    assert reply.json()["error"]["param"] == param and "data:" not in reply.text


def test_64_concurrent_clients_mixed_traffic(server):
    rng = random.Random(0)
    kinds = ["plain", "single", "mixed", "invalid"]

    async def one(client, i):
        kind = kinds[i % 4]
        xargs = {"plain": None, "single": {"emotion": rng.choice(["joy", "anger", "fear"]), "intensity": 1.0},
                 "mixed": {"emotions": ["joy", "sadness"], "intensities": [0.7, 0.7]},
                 "invalid": {"emotion": "boredom", "intensity": 1.0}}[kind]
        extra = {"vllm_xargs": xargs} if xargs else None
        use_chat, stream = i % 3 != 0, i % 2 == 0
        try:
            if use_chat:
                response = await client.chat.completions.create(
                    model="smol", messages=QUESTION, max_tokens=12, temperature=0.8, seed=i, extra_body=extra,
                    stream=stream)
            else:
                response = await client.completions.create(
                    model="smol", prompt=f"Story {i}:", max_tokens=12, temperature=0.8, seed=i, extra_body=extra,
                    stream=stream)
            if stream:
                text, finish = "", None
                async for chunk in response:
                    if chunk.choices:
                        piece = chunk.choices[0]
                        text += (piece.delta.content or "") if use_chat else piece.text
                        finish = piece.finish_reason or finish
            else:
                piece = response.choices[0]
                text, finish = (piece.message.content if use_chat else piece.text), piece.finish_reason
            return kind, "ok", text, finish
        except openai.BadRequestError as exc:
            return kind, "400", str(exc), None

    async def main():
        # Model Runner V2 samples through Triton's interpreter here: 48 sampled answers take minutes on 2 cores
        async with server.async_client(timeout=300 if RUNNER == "v1" else 1800) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    for kind, status, text, finish in results:
        if kind == "invalid":
            assert status == "400" and "unknown emotion 'boredom'" in text
        else:
            assert status == "ok" and text and finish in ("length", "stop"), (kind, status, text, finish)
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert chat(server.client()).choices[0].message.content


def test_disconnected_streams_leave_no_stale_state(server):
    client = server.client()
    before = chat(client, {"emotion": "joy", "intensity": 1.0}, max_tokens=24).choices[0].message.content
    for i in range(6):
        with requests.post(server.url + "/v1/chat/completions", stream=True, timeout=60, json={
            "model": "smol", "messages": QUESTION, "max_tokens": 200, "stream": True, "temperature": 0,
            "vllm_xargs": {"emotion": ["anger", "fear", "disgust"][i % 3], "intensity": 3.0},
        }) as response:
            for n, _ in enumerate(response.iter_lines()):
                if n >= 3:
                    break  # hang up mid-stream
    after = chat(client, {"emotion": "joy", "intensity": 1.0}, max_tokens=24).choices[0].message.content
    assert after == before
    assert chat(client, max_tokens=24).choices[0].message.content == chat(client, max_tokens=24).choices[0].message.content


def test_prefix_cache_safety_over_http(server, default_model_dir):
    system = {"role": "system", "content": "You are a friendly assistant at a small seaside hotel. " * 12}
    messages = [system, {"role": "user", "content": "What can I do here this afternoon?"}]
    specs = [None, {"emotion": "sadness", "intensity": 1.5, "steer_positions": "all"},
             {"emotion": "joy", "intensity": 1.5, "steer_positions": "all"}, None,
             {"emotion": "sadness", "intensity": 1.5, "steer_positions": "all"}]
    cached = [chat(server.client(), s, messages=messages, max_tokens=20).choices[0].message.content for s in specs]
    warm_chat = two_turns(server, system)
    fresh_server = Server(default_model_dir, *SMALL_BLOCKS, "--no-enable-prefix-caching")
    try:
        fresh = [chat(fresh_server.client(), s, messages=messages, max_tokens=20).choices[0].message.content
                 for s in specs]
        cold_chat = two_turns(fresh_server, system)
    finally:
        fresh_server.stop()
    assert cached == fresh
    assert len(set(cached[:3])) == 3
    (warm_text, warm_logprobs, warm_hits), (cold_text, cold_logprobs, cold_hits) = warm_chat, cold_chat
    assert warm_text == cold_text
    assert max(abs(a - b) for a, b in zip(warm_logprobs, cold_logprobs)) < 1e-4
    assert warm_hits > 0 and cold_hits == 0  # the history's unsteered blocks came from the cache


def two_turns(server, system):
    """A steered chat's second turn, whose history holds the first turn's steered answer: its text, logprobs and
    cached prompt tokens."""
    steering = {"emotion": "sadness", "intensity": 1.5}
    messages = [system, {"role": "user", "content": "What can I do here this afternoon?"}]
    first = chat(server.client(), steering, messages=messages, max_tokens=40).choices[0].message.content
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And tomorrow morning?"}]
    reply = chat(server.client(), steering, messages=messages, max_tokens=20, logprobs=True)
    details = reply.usage.prompt_tokens_details
    return (reply.choices[0].message.content, [t.logprob for t in reply.choices[0].logprobs.content],
            (details.cached_tokens or 0) if details else 0)


@pytest.mark.parametrize(
    "emosteer, words",
    [
        ('{"vectors": "/nonexistent/ev.safetensors"}', "vectors file not found: /nonexistent/ev.safetensors"),
        ('{"max_intensity": "high"}', "max_intensity must be a positive number"),
    ],
)
def test_bad_start_stops_with_a_clear_message(default_model_dir, emosteer, words):
    srv = Server(default_model_dir, emosteer=emosteer, wait=False)
    try:
        _, err = srv.process.communicate(timeout=240)
    finally:
        srv.stop()
    assert srv.process.returncode != 0
    assert words in err and "Traceback" not in err


def test_mismatched_vectors_stop_the_server(default_model_dir, tiny_bank_path):
    srv = Server(default_model_dir, emosteer=f'{{"vectors": "{tiny_bank_path}"}}', wait=False)
    try:
        _, err = srv.process.communicate(timeout=240)
    finally:
        srv.stop()
    assert srv.process.returncode != 0
    assert "vectors have hidden size 128, model has 576" in err and "Traceback" not in err


def test_beam_search_with_steering_is_refused_not_run_unsteered(server):
    for path, body in (("/v1/chat/completions", {"messages": QUESTION}), ("/v1/completions", {"prompt": "My day"})):
        response = requests.post(server.url + path, timeout=60, json={
            "model": "smol", "max_tokens": 4, "use_beam_search": True, "n": 2,
            "vllm_xargs": {"emotion": "joy", "intensity": 1.0}, **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "beam search" in error["message"] and error["param"] == "use_beam_search"
    plain = requests.post(server.url + "/v1/completions", timeout=60, json={
        "model": "smol", "prompt": "My day", "max_tokens": 4, "use_beam_search": True, "n": 2})
    assert plain.status_code == 200, plain.text


def test_steer_raw_over_http(server):
    client = server.client()
    raw = {"emotion": "joy", "intensity": 2.0}
    answers = {value: chat(client, dict(raw, steer_raw=value), max_tokens=12).choices[0].message.content
               for value in (True, "true", 1, False, "false")}
    assert answers[True] == answers["true"] == answers[1]
    assert answers[False] == answers["false"] == chat(client, raw, max_tokens=12).choices[0].message.content
    assert answers[True] != answers[False]
