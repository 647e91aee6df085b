"""LoRA batches with steering (issue 29, item 9). In a batch with adapters, vLLM's CPU LoRA path gives a row without
an adapter results that are not reproducible, plugin or not: they differ from the same request alone, and between
two engines (or two runs, on Model Runner V2) given the same batch without the plugin. So the rows with an adapter
are the ones that can be held to exactness, and they are: the same batch gives them the same tokens and logprobs
with and without the plugin, and steered or not each equals the same request alone."""

import json
import os

import pytest
import torch
from conftest import TINY_LAYERS
from engine_helpers import params, prompt, shutdown, tiny_llm, tokens_and_logprobs
from safetensors.torch import save_file
from vllm.lora.request import LoRARequest

from vllm_emosteer import steer

LORA = dict(enable_lora=True, max_loras=2, max_lora_rank=8)
PROMPTS = [prompt(16 + 5 * i, 300 + i) for i in range(6)]
ADAPTER_ROWS = (1, 2, 4, 5)  # the batch is [none, a, b] * 2


def make_adapter(folder, seed):
    """A random rank-8 LoRA adapter on q_proj and v_proj of the tiny Llama, in PEFT's layout."""
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(TINY_LAYERS):
        for name, out in (("q_proj", 128), ("v_proj", 64)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            weights[f"{key}.lora_A.weight"] = torch.randn(8, 128, generator=g) * 0.1
            weights[f"{key}.lora_B.weight"] = torch.randn(out, 8, generator=g) * 0.1
    save_file(weights, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "bias": "none", "target_modules": ["q_proj", "v_proj"]}))
    return str(folder)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return [None, LoRARequest("a", 1, make_adapter(root / "a", 1)), LoRARequest("b", 2, make_adapter(root / "b", 2))]


def run(llm, specs, loras, prompts=PROMPTS):
    outputs = llm.generate(prompts, [params(s) for s in specs], lora_request=loras)
    return [tokens_and_logprobs(o) for o in outputs]


def test_lora_batches_are_the_same_with_and_without_the_plugin(tiny_llama, tiny_bank_path, adapters):
    loras = adapters * 2
    unsteered = [None] * 6
    os.environ["VLLM_PLUGINS"] = "none-such-plugin"  # an allowlist naming nothing: workers load no plugin
    try:
        plain = tiny_llm(tiny_llama, emosteer=False, **LORA)
    finally:
        del os.environ["VLLM_PLUGINS"]
    try:
        without = run(plain, unsteered, loras)
    finally:
        shutdown(plain)
    llm = tiny_llm(tiny_llama, tiny_bank_path, **LORA)
    try:
        with_plugin = run(llm, unsteered, loras)
        for i in ADAPTER_ROWS:  # the plugin, unsteered: vLLM's LoRA batch, bit for bit
            assert with_plugin[i] == without[i], f"row {i}"
        specs = [None] * 3 + [steer(joy=1.5), steer(anger=1.0, positions="all"), steer(sadness=2.0)]
        mixed = run(llm, specs, loras)
        for i in ADAPTER_ROWS:  # unsteered and steered: as alone
            assert mixed[i] == run(llm, [specs[i]], [loras[i]], [PROMPTS[i]])[0], f"row {i}"
        assert mixed[4][0] != run(llm, [None], [loras[4]], [PROMPTS[4]])[0][0]  # steering took effect with LoRA
    finally:
        shutdown(llm)
