"""Scale-out inside one `vllm serve`: data parallelism (`--data-parallel-size 2`: two engine cores, and by vLLM's
default two API servers). Concurrent steered requests get exactly the tokens one engine gives them, both engines
serve steered requests, and bad steering is a 400 from whichever API server takes it."""

import concurrent.futures

import pytest
import requests
from engine_helpers import shutdown
from server_helpers import Server
from vllm import LLM, SamplingParams

PROMPTS = [f"Write one sentence about {topic}:" for topic in
           ("the sea", "a train", "my garden", "winter", "a letter", "the market")]
STEERING = [None, {"emotion": "joy", "intensity": 1.0}, {"emotions": ["sadness", "fear"], "intensities": [0.8, 0.6]},
            {"emotion": "fear", "intensity": 1.2, "steer_positions": "all"}]
CASES = [(p, s) for p in PROMPTS for s in STEERING[:2]] + [(PROMPTS[0], s) for s in STEERING[2:]]  # 14 requests
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def one_engine(default_model_dir):
    """The reference: the same requests on one engine (offline, fp32, greedy)."""
    llm = LLM(model=str(default_model_dir), dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=32,
              seed=0, additional_config={"emosteer": {}})
    try:
        outputs = llm.generate([p for p, _ in CASES], [SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                      extra_args=s) for _, s in CASES])
        return [o.outputs[0].text for o in outputs]
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def data_parallel(default_model_dir):
    server = Server(default_model_dir, "--data-parallel-size", "2", "--dtype", "float32")
    yield server
    server.stop()


def complete(server, prompt, xargs):
    return requests.post(server.url + "/v1/completions", timeout=600, json=dict(
        model="smol", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **({"vllm_xargs": xargs} if xargs else {})))


def test_two_engines_steer_exactly_as_one(one_engine, data_parallel):
    with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
        replies = list(pool.map(lambda case: complete(data_parallel, *case), CASES))
    assert [r.status_code for r in replies] == [200] * len(CASES)
    assert [r.json()["choices"][0]["text"] for r in replies] == one_engine
    served = requests.get(data_parallel.url + "/metrics", timeout=30).text
    engines = {line.split('engine="')[1].split('"')[0] for line in served.splitlines()
               if line.startswith("vllm:request_success_total{") and not line.rstrip().endswith(" 0.0")}
    assert engines == {"0", "1"}, "both engines served requests"


def test_bad_steering_is_a_400_from_either_api_server(data_parallel):
    replies = [complete(data_parallel, "Hello", {"emotion": "boredom", "intensity": 1.0}) for _ in range(8)]
    assert all(r.status_code == 400 and "unknown emotion 'boredom'" in r.text for r in replies)
    assert complete(data_parallel, "Hello", {"emotion": "joy", "intensity": 1.0}).status_code == 200
