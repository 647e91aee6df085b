"""Vector sets over HTTP: a real `vllm serve` of the default model with two sets, loading and unloading at run time."""

import asyncio

import pytest
import requests
from server_helpers import Server

from vllm_emosteer.engine.options import bundled_vectors_path
from vllm_emosteer.engine.frontend.set_changes import ALLOW_ENV
from vllm_emosteer.vectors.bank import EmotionBank

QUESTION = [{"role": "user", "content": "Tell me about your day."}]


@pytest.fixture(scope="module")
def sets_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sets")
    bundled = EmotionBank.load(bundled_vectors_path())
    bundled.uncalibrated().save(folder / "alt.safetensors")
    bundled.without_shared_component().save(folder / "centred.safetensors")
    (folder / "corrupt.safetensors").write_bytes(b"garbage")
    broken = bundled.uncalibrated()
    broken.calibration = {"joy": float("nan")}  # JSON carries NaN; the loader must refuse it
    broken.save(folder / "nan.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(default_model_dir, sets_dir):
    emosteer = (f'{{"vectors": {{"emotions": "{bundled_vectors_path()}", "alt": "{sets_dir / "alt.safetensors"}"}},'
                f' "max_sets": 3, "sets_dir": "{sets_dir}"}}')
    srv = Server(default_model_dir, emosteer=emosteer, env={ALLOW_ENV: "1"})
    yield srv
    srv.stop()


def chat(server, xargs=None, max_tokens=16, **kwargs):
    extra = {"vllm_xargs": xargs} if xargs else None
    response = server.client().chat.completions.create(model="smol", messages=QUESTION, max_tokens=max_tokens,
                                                       temperature=0, extra_body=extra, **kwargs)
    return response.choices[0].message.content


def post(server, body):
    return requests.post(server.url + "/v1/emosteer/sets", json=body, timeout=60)


def test_discovery_lists_the_sets(server):
    info = requests.get(server.url + "/v1/emosteer", timeout=10).json()
    assert info["emotions"] == ["joy", "anger", "disgust", "fear", "sadness"] and info["default_set"] == "emotions"
    assert [s["name"] for s in info["sets"]] == ["emotions", "alt"] and info["max_sets"] == 3
    assert info["runtime_updates"] == {"load": True, "unload": True}
    # clients see file names relative to sets_dir (or the bare file name), never a server path
    assert info["vectors"] == "smollm2-135m-instruct.safetensors"
    assert [s["source"] for s in info["sets"]] == ["smollm2-135m-instruct.safetensors", "alt.safetensors"]


def test_load_while_32_clients_stream(server):
    """No request fails while a set loads; the loaded set answers like the same vectors given at start."""

    async def stream(client, i, xargs):
        response = await client.chat.completions.create(
            model="smol", messages=QUESTION, max_tokens=24, temperature=0, stream=True,
            extra_body={"vllm_xargs": xargs})
        text, finish = "", None
        async for chunk in response:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        async with server.async_client(timeout=300) as client:
            specs = [{"emotion": "joy", "intensity": 1.0}, {"emotion": "sadness", "intensity": 0.3, "steer_set": "alt"}]
            before = [asyncio.create_task(stream(client, i, specs[i % 2])) for i in range(16)]
            await asyncio.sleep(0.5)  # the streams are under way
            loaded = await asyncio.to_thread(post, server, {"name": "alt2", "file": "alt.safetensors"})
            after = [asyncio.create_task(stream(client, i, {"emotion": "joy", "intensity": 0.3,
                                                             "steer_set": ["alt", "alt2"][i % 2]}))
                     for i in range(16)]
            return loaded, await asyncio.gather(*before, *after)

    loaded, results = asyncio.run(main())
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["name"] == "alt2" and loaded.json()["emotions"][0] == "joy"
    for text, finish in results:
        assert text and finish in ("length", "stop")
    try:
        start, runtime = (chat(server, {"emotion": "joy", "intensity": 0.3, "steer_set": name}, max_tokens=24)
                          for name in ("alt", "alt2"))
        assert runtime == start
        assert chat(server, {"emotions": ["alt2/joy", "sadness"], "intensities": [0.3, 0.5]})
    finally:
        assert requests.delete(server.url + "/v1/emosteer/sets/alt2", timeout=60).status_code == 200
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("body, status, words", [
    ({"name": "x", "file": "../alt.safetensors"}, 400, "without '..'"),
    ({"name": "x", "file": "/etc/passwd"}, 400, "without '..'"),
    ({"name": "x", "file": "missing.safetensors"}, 404, "no file"),
    ({"name": "x", "file": "corrupt.safetensors"}, 400, "not a readable safetensors file"),
    ({"name": "x y", "file": "alt.safetensors"}, 400, "must be 1-64 letters"),
    ({"name": "alt", "file": "centred.safetensors"}, 409, "replace: true"),
    ({"name": "x", "file": "alt.safetensors", "replace": "yes"}, 400, "'replace' must be true or false"),
    ({"name": "x", "path": "alt.safetensors"}, 400, "'name', 'file'"),
    ({"name": "x", "file": "y" * 300}, 400, "cannot be opened in sets_dir"),
    ({"name": "x", "file": "nan.safetensors"}, 400, "calibration of joy must be finite"),
])
def test_bad_loads_get_a_clear_error(server, sets_dir, body, status, words):
    response = post(server, body)
    assert response.status_code == status and words in response.json()["error"]["message"], response.text
    assert str(sets_dir) not in response.json()["error"]["message"]  # no server path in an error
    info = requests.get(server.url + "/v1/emosteer", timeout=10).json()
    assert [s["name"] for s in info["sets"]] == ["emotions", "alt"]


def test_capacity_unload_errors_and_metrics(server):
    assert post(server, {"name": "third", "file": "centred.safetensors"}).status_code == 200
    try:
        full = post(server, {"name": "fourth", "file": "centred.safetensors"})
        assert full.status_code == 409 and "no room" in full.json()["error"]["message"]
        metrics = requests.get(server.url + "/metrics", timeout=10).text
        assert "emosteer_vector_sets 3.0" in metrics
        assert 'emosteer_set_updates_total{action="load",outcome="refused"}' in metrics
    finally:
        assert requests.delete(server.url + "/v1/emosteer/sets/third", timeout=60).status_code == 200
    for name, status in [("nope", 404), ("emotions", 409)]:
        assert requests.delete(server.url + f"/v1/emosteer/sets/{name}", timeout=60).status_code == status
    unknown = requests.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "smol", "messages": QUESTION, "stream": True, "vllm_xargs": {"emotion": "joy", "steer_set": "third"}})
    assert unknown.status_code == 400 and "unknown vector set 'third'" in unknown.json()["error"]["message"]
