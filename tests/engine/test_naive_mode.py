"""The naive baseline (a Python loop over requests per layer, used by the benchmarks) steers the same tokens
as the fused op."""

import numpy as np
from engine_helpers import params, prompt, shutdown, tiny_llm, tokens_and_logprobs

from vllm_emosteer import steer


def test_naive_mode_equals_fused(tiny_llama, tiny_bank_path):
    specs = [steer(joy=1.0), None, steer(anger=0.5, fear=0.5, positions="all"), steer(sadness=1.5, layers=(2, 3))]
    prompts = [prompt(40 + 30 * i, 500 + i) for i in range(len(specs))]  # longer than one 64-token chunk
    results = []
    for mode in ("fused", "naive"):
        llm = tiny_llm(tiny_llama, tiny_bank_path, options={"mode": mode})
        try:
            results.append([tokens_and_logprobs(o) for o in llm.generate(prompts, [params(s) for s in specs])])
        finally:
            shutdown(llm)
    for (ids_f, lp_f), (ids_n, lp_n) in zip(*results):
        assert ids_f == ids_n
        np.testing.assert_allclose(lp_f, lp_n, atol=1e-4)
