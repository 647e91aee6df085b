"""Extraction inside vLLM: the capture mode equals the transformers capture (tiny Llama, fp32)."""

import random

import pytest
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from vllm_emosteer.extraction.extract import Sample, mean_activations
from vllm_emosteer.extraction.vllm_capture import VllmExtractor


def samples(count=7, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(count):  # contexts up to 110 tokens: prefill runs in chunks of 64
        context = [rng.randrange(100, 40000) for _ in range(rng.choice([3, 20, 70, 110]))]
        answer = [rng.randrange(100, 40000) for _ in range(rng.randrange(1, 25))]
        out.append(Sample("joy", "emotional", f"q{i}", context, answer))
    return out


@pytest.fixture(scope="module")
def reference_model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.mark.parametrize("hook", ["attn_out", "residual"])
def test_vllm_capture_equals_transformers_capture(tiny_llama, reference_model, hook):
    batch = samples()
    expected, expected_norms = mean_activations(reference_model, batch, hook, 3, tqdm(disable=True))
    engine = VllmExtractor(str(tiny_llama), hook, dtype="float32", max_num_batched_tokens=64, max_num_seqs=4,
                           max_model_len=256, block_size=32)
    try:
        means, norms = engine.capture(batch, hook, 4, tqdm(total=1, disable=True))
        again, _ = engine.capture(batch[::-1], hook, 4, tqdm(total=1, disable=True))  # other batches, same sums
    finally:
        engine.shutdown()
    torch.testing.assert_close(means, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(expected_norms), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again.flip(0), means, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_2_capture_equals_one_process(tiny_llama, reference_model, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per CPU worker (one NUMA node here)
    batch = samples(4, seed=1)
    expected, _ = mean_activations(reference_model, batch, "attn_out", 4, tqdm(disable=True))
    engine = VllmExtractor(str(tiny_llama), "attn_out", dtype="float32", max_num_batched_tokens=64, max_num_seqs=4,
                           max_model_len=256, block_size=32, tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        means, _ = engine.capture(batch, "attn_out", 4, tqdm(total=1, disable=True))
    finally:
        engine.shutdown()
    torch.testing.assert_close(means, expected, rtol=1e-4, atol=1e-4)
