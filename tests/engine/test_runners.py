"""Both of vLLM's model runners steer: the session's engines run the runner it asked for (EMOSTEER_TEST_RUNNER: the
V1 runner, or Model Runner V2 through Triton's interpreter with the add as the Triton kernel), and the demo prints
the same greedy fp32 text on both."""

import os
import subprocess
import sys

import probes
import pytest
from conftest import RUNNER
from engine_helpers import params, prompt, shutdown, tiny_llm

from vllm_emosteer import steer

EXPECTED_WHERE = {"v1": "V1 model runner, torch: host plan eager, mask and gather compiled",
                  "v2": "Model Runner V2, Triton kernel (Triton's interpreter)"}


def test_engine_runs_the_sessions_runner_and_add_path(tiny_llama, tiny_bank_path):
    llm = tiny_llm(tiny_llama, tiny_bank_path)
    try:
        assert llm.apply_model(probes.steering_where) == [EXPECTED_WHERE[RUNNER]]
        steered, plain = llm.generate([prompt(12, 5)] * 2, [params(steer(joy=2.0)), params()])
    finally:
        shutdown(llm)
    assert steered.outputs[0].token_ids != plain.outputs[0].token_ids  # the add ran


def demo(runner: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_USE_V2_MODEL_RUNNER="1" if runner == "v2" else "0")
    if runner == "v2":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "vllm_emosteer.cli", "demo", "--greedy", "--dtype", "float32",
                           "--max-tokens", "12"], capture_output=True, text=True, timeout=1200, env=env)


@pytest.mark.skipif(RUNNER == "v2", reason="runs both runners itself; once per suite, in the V1 session")
def test_demo_prints_the_same_greedy_text_on_both_runners():
    v1, v2 = demo("v1"), demo("v2")
    assert v1.returncode == 0, v1.stderr[-2000:]
    assert v2.returncode == 0, v2.stderr[-2000:]
    assert "Using V2 Model Runner" in v2.stderr and "Using V2 Model Runner" not in v1.stderr
    assert "21 requests with 7 different steering settings ran in one batch (greedy; 12 tokens)" in v1.stdout
    assert v2.stdout == v1.stdout


UNHOOKED = """
import sys
from engine_helpers import tiny_llm
if __name__ == "__main__":
    tiny_llm(sys.argv[1], sys.argv[2], worker_cls="unhooked_worker.UnhookedWorker")
    print("STARTED")
"""


def test_a_runner_the_plugin_does_not_hook_refuses_to_start(tiny_llama, tiny_bank_path):
    run = subprocess.run([sys.executable, "-c", UNHOOKED, str(tiny_llama), str(tiny_bank_path)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode != 0 and "STARTED" not in run.stdout, run.stdout[-2000:]
    assert "a model runner the plugin does not hook; refusing to run unsteered" in run.stderr, run.stderr[-3000:]
