"""Every architecture the plugin claims, through the real vLLM CPU engine: a tiny random-weight model each
(2 layers, head_dim 64, vocab 2048), one engine per architecture shared by its checks.

* exact offsets at both hook points: a steered request equals an unsteered one plus the test's own hook adding
  sum_e alpha_e EV[l, e] at the module this test names for the architecture (not the plugin's lookup);
* alpha 0 is bit-identical to the same engine with the plugin's hooks removed;
* other requests' specs never change a request's tokens or logprobs;
* a mixed batch equals one request at a time.
DeepSeek-V2/V3 run in bfloat16 (vLLM's CPU MLA), where vLLM is not deterministic from run to run: there the offsets
and alpha 0 are checked on each hooked tensor before and after the plugin's hook, and the last two are skipped.
* the plugin hooks only the attention modules (attn_out) or the layers (residual): MoE experts are untouched.
* a layer that takes `residual` but overwrites it before reading it (Command-R's): residual steering goes into the
  stream it returns first, exactly, and capture records that stream; which vLLM layers are of which kind, by
  structure only.
"""

import functools
import os
import pickle
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import probes
import pytest
import torch
from conftest import EMOTIONS, make_tiny_bank, make_tiny_model
from engine_helpers import params, shutdown, tiny_llm, tokens_and_logprobs
from engine_helpers import prompt as any_prompt

from vllm_emosteer import steer
from vllm_emosteer.vectors.bank import EmotionBank

VOCAB = 2048
LAYERS = 2
COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=2,
              num_key_value_heads=1, head_dim=64, vocab_size=VOCAB, max_position_embeddings=1024,
              bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2)


def tiny_config(arch, **changes):
    import transformers as hf

    common = dict(COMMON, **changes)
    no_head_dim = {k: v for k, v in common.items() if k != "head_dim"}  # derived: hidden / heads = 64
    if arch == "Qwen3ForCausalLM":
        return hf.Qwen3Config(**common)
    if arch == "Qwen3MoeForCausalLM":
        return hf.Qwen3MoeConfig(**common, num_experts=4, moe_intermediate_size=64, decoder_sparse_step=1,
                                 mlp_only_layers=[], **MOE)
    if arch == "MistralForCausalLM":
        return hf.MistralConfig(**common, sliding_window=None)
    if arch == "MixtralForCausalLM":
        return hf.MixtralConfig(**common, num_local_experts=4, **MOE)
    if arch == "Gemma2ForCausalLM":
        return hf.Gemma2Config(**dict(common, tie_word_embeddings=True), query_pre_attn_scalar=64, sliding_window=64)
    if arch == "Phi3ForCausalLM":
        return hf.Phi3Config(**no_head_dim)
    if arch == "GraniteForCausalLM":
        return hf.GraniteConfig(**common, residual_multiplier=0.5, embedding_multiplier=2.0,
                                attention_multiplier=0.125, logits_scaling=2.0)
    if arch == "Olmo2ForCausalLM":
        return hf.Olmo2Config(**no_head_dim)
    if arch == "GptOssForCausalLM":
        return hf.GptOssConfig(**common, num_local_experts=4, sliding_window=64, **MOE)
    if arch in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
        # MLA: vLLM's CPU kernel takes kv_lora_rank + qk_rope_head_dim = 576 only
        v3 = arch == "DeepseekV3ForCausalLM"
        return (hf.DeepseekV3Config if v3 else hf.DeepseekV2Config)(
            **dict(no_head_dim, num_key_value_heads=2), q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=64,
            qk_rope_head_dim=64, v_head_dim=64, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64,
            first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="noaux_tc" if v3 else "greedy", **MOE)
    raise ValueError(arch)


# architecture -> the attribute of its vLLM decoder layer that holds the attention module
ARCHITECTURES = {
    "Qwen3ForCausalLM": "self_attn",
    "Qwen3MoeForCausalLM": "self_attn",
    "MistralForCausalLM": "self_attn",
    "MixtralForCausalLM": "self_attn",
    "Gemma2ForCausalLM": "self_attn",
    "Phi3ForCausalLM": "self_attn",
    "GraniteForCausalLM": "self_attn",
    "Olmo2ForCausalLM": "self_attn",  # vLLM's Transformers backend: the HF layers, [1, T, H] tensors
    "GptOssForCausalLM": "attn",
    "DeepseekV2ForCausalLM": "self_attn",  # MLA; layer 0 dense, layer 1 MoE
    "DeepseekV3ForCausalLM": "self_attn",
}
# vLLM's CPU MLA kernel runs bfloat16 only
DTYPES = {"DeepseekV2ForCausalLM": "bfloat16", "DeepseekV3ForCausalLM": "bfloat16"}
# Engine starts dominate (~30 s each on 2 cores). By default CI runs the architectures whose structure differs;
# Mistral and Phi-3 run vLLM's Llama code, Qwen3 has Qwen3-MoE's layers with a dense MLP, Mixtral is a MoE like
# Qwen3-MoE, DeepSeek-V2 runs V3's code. EMOSTEER_ALL_ARCHITECTURES=1 runs all.
ALL = os.environ.get("EMOSTEER_ALL_ARCHITECTURES") == "1"
CI_ARCHITECTURES = {"Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "Olmo2ForCausalLM",
                    "GptOssForCausalLM", "DeepseekV3ForCausalLM"}
ALL_ONLY = pytest.mark.skipif(not ALL, reason="set EMOSTEER_ALL_ARCHITECTURES=1")
ENGINE_PARAMS = [pytest.param(arch, marks=[] if arch in CI_ARCHITECTURES else ALL_ONLY) for arch in ARCHITECTURES]


def prompt(length, seed):
    return any_prompt(length, seed, vocab_size=VOCAB)


def generate(llm, prompts, specs, max_tokens=6):
    return [tokens_and_logprobs(o) for o in llm.generate(prompts, [params(s, max_tokens) for s in specs])]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("architectures")
    return {arch: make_tiny_model(root / arch, arch, default_model_dir, config=tiny_config(arch))
            for arch in ARCHITECTURES}


@pytest.fixture(scope="module", params=ENGINE_PARAMS)
def engine(request, tiny_models, tmp_path_factory):
    arch = request.param
    model = tiny_models[arch]
    vectors = tmp_path_factory.mktemp("banks") / f"{arch}.safetensors"
    make_tiny_bank(model, vectors, hook="attn_out", scale=1.0)
    # a reference run must never read steered KV
    llm = tiny_llm(model, vectors, enable_prefix_caching=False, dtype=DTYPES.get(arch, "float32"))
    yield arch, llm, EmotionBank.load(vectors)
    shutdown(llm)


def hook_module_names(arch, hook):
    suffix = f".{ARCHITECTURES[arch]}" if hook == "attn_out" else ""
    return [f"model.layers.{i}{suffix}" for i in range(LAYERS)]


# attn_out: the attention's output (a Transformers-backend tuple's first); residual: the layer's last output (the
# stream itself, or the residual of (hidden, residual))
def output_index(hook):
    return 0 if hook == "attn_out" else -1


def deterministic(arch):
    """vLLM's CPU MLA in bfloat16 gives other tokens for the same batch from one run to the next, without the
    plugin: there the checks compare each hooked tensor before and after the plugin's hook, inside one forward."""
    return DTYPES.get(arch, "float32") == "float32"


def hook_deltas(llm, arch, hook, prompts, specs):
    """(layer, before, after) of every hooked tensor while `prompts` run."""
    names = hook_module_names(arch, hook)
    llm.apply_model(functools.partial(probes.capture_deltas, module_names=names, index=output_index(hook)))
    try:
        generate(llm, prompts, specs)
        return [(names.index(name), before, after) for worker in llm.apply_model(probes.take_deltas)
                for name, before, after in pickle.loads(worker)]
    finally:
        llm.apply_model(probes.remove_capture)


@pytest.mark.parametrize("hook", ["attn_out", "residual"])
def test_offsets_are_exact_at_each_hook_point(engine, hook):
    arch, llm, bank = engine
    llm.apply_model(functools.partial(probes.attach_steering, hook=hook))
    assert llm.apply_model(probes.hooked_modules)[0] == hook_module_names(arch, hook)  # experts untouched
    mix = {"joy": 1.0, "anger": -0.5}
    prompts = [prompt(30, 1), prompt(45, 2)]
    plain = generate(llm, prompts, [None, None])
    steered = generate(llm, prompts, [steer(positions="all", **mix)] * 2)
    offsets = [sum(v * bank.vectors[layer, EMOTIONS.index(e)] for e, v in mix.items()) for layer in range(LAYERS)]
    try:
        assert steered != plain, f"{arch}: steering at {hook} changed nothing"
        if not deterministic(arch):  # the offset, summed in fp32 and rounded once into x, exactly
            deltas = hook_deltas(llm, arch, hook, prompts, [steer(positions="all", **mix)] * 2)
            assert len(deltas) >= LAYERS
            for layer, before, after in deltas:
                assert torch.equal(after, (before.float() + offsets[layer]).to(before.dtype)), f"layer {layer}"
            return
        llm.apply_model(functools.partial(probes.add_reference_offsets, module_names=hook_module_names(arch, hook),
                                          offsets=offsets, index=output_index(hook)))
        try:
            reference = generate(llm, prompts, [None, None])
        finally:
            llm.apply_model(probes.remove_reference_offsets)
    finally:
        llm.apply_model(functools.partial(probes.attach_steering, hook="attn_out"))
    for (ids_s, lp_s), (ids_r, lp_r) in zip(steered, reference):
        assert ids_s == ids_r
        np.testing.assert_allclose(lp_s, lp_r, atol=1e-4)


def test_alpha_zero_is_bit_identical_to_no_hooks(engine):
    arch, llm, _ = engine
    prompts = [prompt(20 + 9 * i, 10 + i) for i in range(3)]
    zero_specs = [steer(joy=0.0), None, steer(anger=0.0, fear=0.0, positions="all")]
    if not deterministic(arch):
        deltas = hook_deltas(llm, arch, "attn_out", prompts, zero_specs)
        assert deltas and all(torch.equal(before, after) for _, before, after in deltas)
        return
    zero = generate(llm, prompts, zero_specs)
    llm.apply_model(probes.detach_steering)
    try:
        unhooked = generate(llm, prompts, [None] * 3)
    finally:
        llm.apply_model(functools.partial(probes.attach_steering, hook="attn_out"))
    assert zero == unhooked


def test_other_requests_specs_never_matter(engine):
    arch, llm, _ = engine
    if not deterministic(arch):
        pytest.skip(deterministic.__doc__)
    prompts = [prompt(20, 31), prompt(27, 32), prompt(34, 33)]
    first = generate(llm, prompts, [steer(joy=1.5), None, steer(fear=0.8, positions="all")])
    second = generate(llm, prompts, [steer(joy=1.5), steer(anger=2.0, sadness=-1.0), None])
    assert first[0] == second[0]
    assert first[1] != second[1] and first[2] != second[2]


def test_mixed_batch_equals_one_request_at_a_time(engine):
    arch, llm, _ = engine
    if not deterministic(arch):
        pytest.skip(deterministic.__doc__)
    specs = [steer(joy=1.0), None, steer(anger=0.5, disgust=0.5), steer(sadness=2.0, layers=(1, 1)),
             steer(fear=-1.0, positions="all")]
    prompts = [prompt(10 + 7 * i, 20 + i) for i in range(len(specs))]
    batched = generate(llm, prompts, specs)
    assert len(set(map(str, batched))) == len(specs)
    for p, s, (ids_b, lp_b) in zip(prompts, specs, batched):
        ids_s, lp_s = generate(llm, [p], [s])[0]
        assert ids_b == ids_s
        np.testing.assert_allclose(lp_b, lp_s, atol=1e-4)


@pytest.mark.parametrize("arch", ["GraniteForCausalLM", "GptOssForCausalLM"])
@pytest.mark.parametrize("hook", ["attn_out", "residual"])
def test_extraction_finds_the_layers(tmp_path_factory, default_model_dir, arch, hook):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_emosteer.extraction.extract import extract

    folder = tmp_path_factory.getbasetemp() / f"extract-{arch}"  # the tokenizer's whole vocabulary: chat prompts
    make_tiny_model(folder, arch, default_model_dir, config=tiny_config(arch, vocab_size=49152))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bank, _ = extract(model, tokenizer, emotions=["joy"], recipe="paper", questions_per_emotion=1, hook=hook,
                      max_new_tokens=2, batch_size=2, filter_pairs=False)
    assert list(bank.vectors.shape) == [LAYERS, 1, 128] and bank.model["architecture"] == arch
    assert bank.vectors.isfinite().all() and (bank.vectors.abs().sum(-1) > 0).all()


REFUSAL_SCRIPT = """
import os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its exception comes back here
import torch
from vllm.model_executor.models import llama
from engine_helpers import tiny_llm

case, model, vectors = sys.argv[1:]
if case == "no-attention":  # the layers' attention module is renamed once the weights are in
    load_weights = llama.LlamaForCausalLM.load_weights
    def renamed(self, weights):
        loaded = load_weights(self, weights)
        for layer in self.model.layers:
            layer.mixer = layer._modules.pop("self_attn")
        return loaded
    llama.LlamaForCausalLM.load_weights = renamed
else:  # the attention output gains a dimension
    forward = llama.LlamaAttention.forward
    llama.LlamaAttention.forward = lambda self, *a, **k: forward(self, *a, **k).unsqueeze(1)
if __name__ == "__main__":
    try:
        tiny_llm(model, vectors, distributed_executor_backend="uni")
    except Exception as exc:
        print("REFUSED", type(exc).__name__, exc)
"""


@pytest.mark.parametrize("case, words", [
    ("no-attention", re.escape("emosteer cannot steer LlamaForCausalLM at attn_out: decoder layer 0 "
                               "(LlamaDecoderLayer) has no attention module (self_attn, attn, attention)")),
    ("wrong-shape", "emosteer cannot steer LlamaForCausalLM at attn_out: the attention output is "
                    r"\[\d+, 1, 128\], not \[tokens, 128\]"),
])
def test_a_model_that_does_not_fit_is_refused_at_start(tiny_llama, tiny_bank_path, tmp_path, case, words):
    script = tmp_path / "refuse.py"
    script.write_text(textwrap.dedent(REFUSAL_SCRIPT))
    run = subprocess.run([sys.executable, str(script), case, str(tiny_llama), str(tiny_bank_path)],
                         capture_output=True, text=True, timeout=300)
    refused = [line for line in run.stdout.splitlines() if line.startswith("REFUSED")]
    assert refused, run.stdout[-2000:] + run.stderr[-3000:]
    assert re.fullmatch(f"REFUSED UnsupportedModelError {words}", refused[0]), refused[0]


def test_a_model_without_decoder_layers_is_refused():
    from vllm_emosteer.engine.worker.hooks import UnsupportedModelError, hook_targets

    class Encoderish(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(UnsupportedModelError,
                       match=r"^emosteer cannot steer Encoderish: it has no decoder layers at model.model.layers$"):
        hook_targets(Encoderish(), "residual", [0], torch.float32)


def test_deepseek_residual_in_float16_is_refused():
    """vLLM's DeepSeek-V2/V3 layers divide the stream by routed_scaling_factor in float16 (vLLM's CPU MLA kernel
    runs bfloat16 only, so this is checked on the layer attribute the plugin reads)."""
    from vllm_emosteer.engine.worker.hooks import UnsupportedModelError, hook_targets

    class DeepseekLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
            self.model.layers[0].routed_scaling_factor = 2.5

    with pytest.raises(UnsupportedModelError, match="cannot steer DeepseekLike at residual in float16"):
        hook_targets(DeepseekLike(), "residual", [0], torch.float16)
    assert list(hook_targets(DeepseekLike(), "residual", [0], torch.bfloat16)) == [0]


@pytest.mark.parametrize("arch, hook", [
    ("Olmo2ForCausalLM", "residual"),  # Transformers backend: [1, T, H], layers that return the stream
    pytest.param("GptOssForCausalLM", "attn_out", marks=ALL_ONLY),
])
def test_vllm_extraction_equals_the_transformers_capture(tiny_models, arch, hook):
    from transformers import AutoModelForCausalLM
    from tqdm.auto import tqdm

    from vllm_emosteer.extraction.extract import Sample, mean_activations
    from vllm_emosteer.extraction.vllm_capture import VllmExtractor

    rng = np.random.default_rng(0)
    batch = [Sample("joy", "emotional", f"q{i}", rng.integers(100, VOCAB, n).tolist(),
                    rng.integers(100, VOCAB, m).tolist()) for i, (n, m) in enumerate([(3, 5), (20, 12), (70, 1), (9, 30)])]
    reference = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    expected, _ = mean_activations(reference, batch, hook, 2, tqdm(disable=True))
    engine = VllmExtractor(str(tiny_models[arch]), hook, dtype="float32", max_num_batched_tokens=64, max_num_seqs=4,
                           max_model_len=256, block_size=32)
    try:
        means, _ = engine.capture(batch, hook, 4, tqdm(total=1, disable=True))
    finally:
        engine.shutdown()
    torch.testing.assert_close(means, expected, rtol=1e-4, atol=1e-4)


# ---- layers that take `residual` and overwrite it before reading it (vLLM's Command-R and ~15 others) ----------
COHERE_LAYERS = 4


def test_a_layer_that_overwrites_the_residual_is_steered_in_the_stream(tmp_path_factory, default_model_dir):
    """vLLM's CohereDecoderLayer takes `residual` but sets it to its own input, and returns (input + attention +
    MLP, input): the first is the stream, the second nobody reads (the next layer overwrites it, the final norm
    ignores it). The offset must land in the first, exactly, and capture mode must record the stream."""
    from transformers import AutoConfig, AutoModelForCausalLM, CohereConfig
    from tqdm.auto import tqdm

    from vllm_emosteer.extraction.extract import Sample, mean_activations
    from vllm_emosteer.extraction.vllm_capture import VllmExtractor

    root = tmp_path_factory.mktemp("cohere-residual")
    config = CohereConfig(**dict(COMMON, num_hidden_layers=COHERE_LAYERS, tie_word_embeddings=True),  # vLLM ties
                          logit_scale=1.0)
    model = make_tiny_model(root / "model", "CohereForCausalLM", default_model_dir, config=config)
    vectors = root / "residual.safetensors"
    bank = make_tiny_bank(model, vectors, hook="residual", scale=1.0)
    mix = {"joy": 1.0, "anger": -0.5}
    offsets = [sum(v * bank.vectors[layer, EMOTIONS.index(e)] for e, v in mix.items())
               for layer in range(COHERE_LAYERS)]
    layers = [f"model.layers.{i}" for i in range(COHERE_LAYERS)]
    prompts = [prompt(30, 1), prompt(45, 2)]
    specs = [steer(positions="all", **mix)] * 2
    rng = np.random.default_rng(0)
    batch = [Sample("joy", "emotional", f"q{i}", rng.integers(100, VOCAB, n).tolist(),
                    rng.integers(100, VOCAB, m).tolist()) for i, (n, m) in enumerate([(3, 5), (20, 12), (70, 9)])]
    llm = tiny_llm(model, vectors, options={"capture": "residual"}, enable_prefix_caching=False)
    try:
        plain = generate(llm, prompts, [None, None])
        steered = generate(llm, prompts, specs)
        assert steered != plain, "steering at residual changed nothing"
        # the test's own offset added to each layer's first output (the stream)
        llm.apply_model(functools.partial(probes.add_reference_offsets, module_names=layers, offsets=offsets, index=0))
        try:
            reference = generate(llm, prompts, [None, None])
        finally:
            llm.apply_model(probes.remove_reference_offsets)
        llm.apply_model(functools.partial(probes.capture_deltas, module_names=layers, index=0))
        try:
            generate(llm, prompts, specs)
            deltas = pickle.loads(llm.apply_model(probes.take_deltas)[0])
        finally:
            llm.apply_model(probes.remove_capture)
        engine = SimpleNamespace(llm=llm, config=AutoConfig.from_pretrained(model))
        means, _ = VllmExtractor.capture(engine, batch, "residual", 4, tqdm(total=1, disable=True))
    finally:
        shutdown(llm)
    for (ids_s, lp_s), (ids_r, lp_r) in zip(steered, reference):
        assert ids_s == ids_r
        np.testing.assert_allclose(lp_s, lp_r, atol=1e-4)
    assert len(deltas) >= COHERE_LAYERS
    for name, before, after in deltas:  # the stream after the plugin's hook: before + offset, exactly
        assert torch.equal(after, (before.float() + offsets[layers.index(name)]).to(before.dtype)), name
    reference_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    expected, _ = mean_activations(reference_model, batch, "residual", 4, tqdm(disable=True))
    torch.testing.assert_close(means, expected, rtol=1e-4, atol=1e-4)  # capture: the stream, as transformers has it


def bare(cls):
    """An instance of a vLLM module class without its weights or config: only its forward is read."""
    layer = cls.__new__(cls)
    torch.nn.Module.__init__(layer)
    return layer


def test_how_vllm_layers_hand_the_stream_on_is_read_from_their_forward():
    from transformers.models.olmo2.modeling_olmo2 import Olmo2DecoderLayer  # vLLM's Transformers backend runs it
    from vllm.model_executor.models import (commandr, deepseek_v2, exaone4, gemma2, gemma3, gpt_oss, granite,
                                            granitemoehybrid, llama, minicpm, phimoe, qwen2, qwen3, qwen3_moe)

    from vllm_emosteer.model_layers import HIDDEN_PLUS_RESIDUAL, STREAM, STREAM_AND_IGNORED, residual_kind

    expected = {
        HIDDEN_PLUS_RESIDUAL: [llama.LlamaDecoderLayer, qwen2.Qwen2DecoderLayer, qwen3.Qwen3DecoderLayer,
                               qwen3_moe.Qwen3MoeDecoderLayer, gemma2.Gemma2DecoderLayer, gemma3.Gemma3DecoderLayer,
                               deepseek_v2.DeepseekV2DecoderLayer, gpt_oss.TransformerBlock],
        STREAM_AND_IGNORED: [commandr.CohereDecoderLayer, exaone4.Exaone4DecoderLayer, phimoe.PhiMoEDecoderLayer,
                             minicpm.MiniCPMDecoderLayer, granitemoehybrid.GraniteMoeHybridAttentionDecoderLayer,
                             granitemoehybrid.GraniteMoeHybridMambaDecoderLayer],
        STREAM: [granite.GraniteDecoderLayer, Olmo2DecoderLayer],
    }
    found = {kind: [residual_kind(bare(cls), "Tiny") for cls in classes] for kind, classes in expected.items()}
    assert found == {kind: [kind] * len(classes) for kind, classes in expected.items()}


def test_every_vllm_layer_that_takes_residual_is_decided():
    """Each vLLM class whose forward takes `residual` either reads it before assigning it or overwrites it first,
    so that none is refused (or steered where nobody reads) unnoticed; Plamo 3's attention mixer (not a decoder
    layer) passes it through unread."""
    import ast
    import importlib.util
    from pathlib import Path

    from vllm_emosteer.model_layers import residual_use

    models = Path(importlib.util.find_spec("vllm").origin).parent / "model_executor" / "models"
    uses = {}
    for path in sorted(models.glob("*.py")):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            for forward in (f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "forward"):
                if "residual" in [a.arg for a in forward.args.args + forward.args.kwonlyargs]:
                    uses[f"{path.stem}.{cls.name}"] = residual_use(forward)
    assert {name for name, use in uses.items() if use is None} == {"plamo3.Plamo3AttentionMixer"}
    assert {"commandr.CohereDecoderLayer", "cohere2_moe.Cohere2MoeDecoderLayer", "gemma4.Gemma4DecoderLayer",
            "hyperclovax.HyperCLOVAXDecoderLayer"} <= {name for name, use in uses.items() if use == "overwritten"}
    assert uses["llama.LlamaDecoderLayer"] == "read" and len(uses) > 50


def test_a_layer_whose_residual_use_is_unclear_or_mixed_is_refused():
    from vllm_emosteer.engine.worker.hooks import UnsupportedModelError, hook_targets

    class Conditional(torch.nn.Module):
        def forward(self, positions, hidden_states, residual):
            if positions is None:
                residual = hidden_states
            return hidden_states + residual, residual

    class Reads(torch.nn.Module):
        def forward(self, positions, hidden_states, residual):
            if residual is None:
                residual = hidden_states
            return hidden_states, residual

    class Overwrites(torch.nn.Module):
        def forward(self, positions, hidden_states, residual):
            residual = hidden_states
            return hidden_states + 1, residual

    class Tiny(torch.nn.Module):
        def __init__(self, *layers):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList(layers)

    with pytest.raises(UnsupportedModelError, match=re.escape(
            "emosteer cannot steer Tiny at residual: the forward of its decoder layer Conditional takes `residual` "
            "but it neither reads `residual` nor assigns it unconditionally before any read, so whether the layer "
            "returns (hidden, residual) or the stream is unknown")):
        hook_targets(Tiny(Reads(), Conditional()), "residual", [0], torch.float32)
    with pytest.raises(UnsupportedModelError, match=r"^emosteer cannot steer Tiny at residual: its decoder layers "
                       r"hand the stream on in different ways \(layer 0, Reads, returns \(hidden, residual\) whose "
                       r"sum is the stream; layer 1, Overwrites, returns \(stream, what the next layer ignores\)\); "
                       r"use attn_out$"):
        hook_targets(Tiny(Reads(), Overwrites()), "residual", [0, 1], torch.float32)
    assert list(hook_targets(Tiny(Overwrites(), torch.nn.Linear(4, 4)), "residual", [0, 1], torch.float32)) == [0, 1]
