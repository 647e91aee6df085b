"""Malformed requests over HTTP never hurt the server: a seeded fuzz of every steering field and of the vector-set
endpoints gets no 5xx, no 200 for a malformed steering field, and leaves the server serving steered chats as
before. The server is started as a user would, `vllm-emosteer serve` without VLLM_PLUGINS: its routes load."""

import random

import pytest
import requests
from server_helpers import Server

from vllm_emosteer.engine.options import bundled_vectors_path
from vllm_emosteer.engine.prefix_cache import CACHE_KEY
from vllm_emosteer.engine.frontend.set_changes import ALLOW_ENV
from vllm_emosteer.vectors.bank import EmotionBank

QUESTION = [{"role": "user", "content": "Tell me about your day."}]
GOOD = {"emotion": "joy", "intensity": 1.0}
JUNK = [None, "", "joy", "JOY ", "1e9", "nan", -1, 0, 9, 10 ** 30, 1e308, -1e308, 3.5, [], [1, 2, 3], ["joy"],
        [[1]], {"a": 1}, True, "x" * 5000, "\u0000", "../../etc/passwd", "emotions/joy", "alt/joy"]


def malformed(rng: random.Random) -> dict:
    """One steering request that is wrong by construction, with some valid fields around the wrong one."""
    pick = rng.choice
    cases = [
        lambda: {"emotion": pick(["love", "Joyful", "", "x" * 300, "emotions/", "/joy", "nope/joy"])},
        lambda: {"emotion": "joy", "intensity": pick([9, -9, 10 ** 30, 1e308, "2", "", [1.0]])},
        lambda: {"emotions": pick([["joy"], ["joy", "fear"]]), "intensities": pick([[1.0, 2.0, 3.0], [], "1"])},
        lambda: {"emotions": pick(["joy", 3, None]), "intensities": [1.0]},
        lambda: {"emotions": ["joy", "joy"], "intensities": [1.0, 0.5]},
        lambda: dict(GOOD, steer_layers=pick([[0], [5, 2], [0, 30], [-1, 3], "0-3", [0.5, 3], 7])),
        lambda: dict(GOOD, steer_positions=pick(["prompt", "", "ALL", 1, ["all"]])),
        lambda: dict(GOOD, steer_raw=pick(["yes", 2, -1, "", [True], 0.5])),
        lambda: dict(GOOD, steer_set=pick(["nope", "", 3, ["emotions"], "../x"])),
        lambda: {pick(["Emotion", "emotions ", "steer_layer", "STEER_RAW", "steer_foo"]): pick(JUNK[:8])},
        lambda: {pick(["steer_layers", "steer_positions", "steer_raw", "steer_set"]): pick([[1, 2], "all", 1, "alt"])},
        lambda: {CACHE_KEY: pick([["k", "all"], "k", 1]), **pick([{}, GOOD])},
        lambda: {"intensity": pick([1.0, "1"])},
    ]
    return pick(cases)()


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    sets_dir = tmp_path_factory.mktemp("fuzz-sets")
    EmotionBank.load(bundled_vectors_path()).uncalibrated().save(sets_dir / "alt.safetensors")
    (sets_dir / "corrupt.safetensors").write_bytes(b"garbage")
    srv = Server(default_model_dir, emosteer=f'{{"max_sets": 2, "sets_dir": "{sets_dir}"}}', env={ALLOW_ENV: "1"},
                 plugins=None)
    yield srv
    srv.stop()


def completion(server, xargs, path="/v1/chat/completions", **body):
    body = {"model": "smol", "max_tokens": 2, "temperature": 0, "vllm_xargs": xargs, **body}
    body.update({"messages": QUESTION} if "chat" in path else {"prompt": "My day was"})
    return requests.post(server.url + path, json=body, timeout=120)


def test_routes_load_without_vllm_plugins(server):
    info = requests.get(server.url + "/v1/emosteer", timeout=10)
    assert info.status_code == 200 and info.json()["enabled"]


def test_malformed_steering_is_always_a_400(server):
    rng = random.Random(23)
    reference = completion(server, GOOD, max_tokens=12).json()["choices"][0]["message"]["content"]
    statuses = {}
    for i in range(240):
        xargs = malformed(rng)
        path = "/v1/chat/completions" if i % 3 else "/v1/completions"
        response = completion(server, xargs, path, stream=i % 5 == 0)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code == 400, (xargs, response.status_code, response.text[:300])
        assert response.json()["error"]["message"], response.text
    assert statuses == {400: 240}
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    again = completion(server, GOOD, max_tokens=12).json()["choices"][0]["message"]["content"]
    assert again == reference


def test_set_endpoints_never_fail_with_a_5xx(server):
    rng = random.Random(19)
    names = ["x", "", "alt", "emotions", "a" * 65, "a/b", "..", "%2e%2e", "x y", "\u00e9", "1" * 300]
    files = ["alt.safetensors", "corrupt.safetensors", "missing.safetensors", "../alt.safetensors", "/etc/passwd",
             "", "x" * 400, "a/" * 100 + "b", ".", "sub/../alt.safetensors", 7, None, ["alt.safetensors"]]
    seen = set()
    for _ in range(120):
        kind = rng.randrange(4)
        if kind == 0:
            body = {"name": rng.choice(names), "file": rng.choice(files)}
            if rng.random() < 0.3:
                body["replace"] = rng.choice([True, False, "yes", 1, None])
            response = requests.post(server.url + "/v1/emosteer/sets", json=body, timeout=60)
        elif kind == 1:
            raw = rng.choice(["", "{", "[]", "null", "3", '{"name": 1, "file": 2}', '{"extra": 1}', "\xff\xfe"])
            response = requests.post(server.url + "/v1/emosteer/sets", data=raw.encode("utf-8", "surrogateescape"),
                                     headers={"Content-Type": "application/json"}, timeout=60)
        else:
            name = requests.utils.quote(rng.choice(names), safe="")
            response = requests.delete(server.url + f"/v1/emosteer/sets/{name}", timeout=60)
        seen.add(response.status_code)
        assert response.status_code < 500, (kind, response.status_code, response.text[:300])
        if response.status_code == 200 and kind == 0:  # a valid load: undo it, the fuzz goes on from the start
            assert requests.delete(server.url + f"/v1/emosteer/sets/{response.json()['name']}",
                                   timeout=60).status_code == 200
    assert seen & {400, 404, 409}
    info = requests.get(server.url + "/v1/emosteer", timeout=10).json()
    assert [s["name"] for s in info["sets"]] == ["emotions"]
    assert completion(server, GOOD).status_code == 200
