"""Engines that cannot be steered refuse to start, with a message that says why (before loading weights)."""

import pytest
import torch
from conftest import make_tiny_bank, make_tiny_model
from engine_helpers import tiny_llm

from vllm_emosteer.vectors.bank import EmotionBank


def test_mismatched_vectors_refused(tiny_llama, tmp_path):
    narrow = EmotionBank(torch.randn(4, 1, 64), ["joy"], "attn_out", [0, 1, 2, 3]).save(tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match="vectors have hidden size 64, model has 128"):
        tiny_llm(tiny_llama, narrow)
    deep = EmotionBank(torch.randn(6, 1, 128), ["joy"], "attn_out", list(range(6))).save(tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="vectors cover layers up to 5, model has 4 layers"):
        tiny_llm(tiny_llama, deep)


def test_missing_file_and_bundled_vectors_for_another_model(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="vectors file not found"):
        tiny_llm(tiny_llama, tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="bundled vectors are for SmolLM2-135M-Instruct, not this model"):
        tiny_llm(tiny_llama)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"max_intensity": -1}, "max_intensity must be a positive number"),
        ({"max_emotions": 0}, "max_emotions must be a positive integer"),
        ({"layers": [2, 9]}, "layers must be \\[first, last\\]"),
        ({"mode": "turbo"}, "mode must be one of"),
        ({"vector": "x"}, "unknown emosteer options \\['vector'\\]"),
    ],
)
def test_bad_engine_options_refused(tiny_llama, tiny_bank_path, options, words):
    from vllm import LLM

    with pytest.raises(ValueError, match=words):
        LLM(model=str(tiny_llama), additional_config={"emosteer": {"vectors": str(tiny_bank_path), **options}})


def test_naive_mode_needs_eager(tiny_llama, tiny_bank_path):
    from vllm import LLM

    with pytest.raises(ValueError, match="needs enforce_eager"):
        LLM(model=str(tiny_llama), additional_config={"emosteer": {"vectors": str(tiny_bank_path), "mode": "naive"}})


def test_steering_args_on_an_engine_without_steering_are_refused(tiny_llama):
    from engine_helpers import params, prompt, shutdown

    from vllm_emosteer import steer

    llm = tiny_llm(tiny_llama, emosteer=False)
    try:
        with pytest.raises(ValueError, match="started without steering"):
            llm.generate([prompt(8, 1)], [params(steer(joy=1.0))])
        assert len(llm.generate([prompt(8, 1)], [params()])[0].outputs[0].token_ids) == 8
    finally:
        shutdown(llm)


@pytest.mark.parametrize(
    "arch, hook", [("Qwen2ForCausalLM", "attn_out"), ("Gemma3ForCausalLM", "attn_out"), ("LlamaForCausalLM", "residual")]
)
def test_other_architectures_and_hooks_are_steered(tmp_path, default_model_dir, arch, hook):
    from engine_helpers import params, prompt, shutdown, tokens_and_logprobs

    from vllm_emosteer import steer

    model = make_tiny_model(tmp_path / arch, arch, default_model_dir)
    vectors = tmp_path / "v.safetensors"
    make_tiny_bank(model, vectors, hook=hook, scale=2.0)
    llm = tiny_llm(model, vectors)
    try:
        specs = [None, steer(joy=0.0), steer(joy=2.0), steer(sadness=2.0, positions="all")]
        outs = [tokens_and_logprobs(o) for o in llm.generate([prompt(20, 5)] * 4, [params(s) for s in specs])]
    finally:
        shutdown(llm)
    assert outs[0] == outs[1]
    assert outs[2] != outs[0] and outs[3] != outs[0] and outs[2] != outs[3]


def test_the_http_routes_are_loaded_without_dropping_other_plugins():
    """vLLM loads endpoint plugins only when VLLM_PLUGINS names them; `vllm-emosteer serve` adds ours to the
    user's list (or to every installed general plugin) and `vllm serve` without it gets a start-up warning."""
    from vllm_emosteer.engine.frontend.validation import routes_allowed
    from vllm_emosteer.serving.serve import plugins_with_ours

    assert plugins_with_ours("lora_resolver, other") == "lora_resolver,other,emosteer"
    assert plugins_with_ours("emosteer,other") == "emosteer,other"
    assert "emosteer" in plugins_with_ours(None).split(",")
    assert routes_allowed(plugins_with_ours(None)) and routes_allowed("a, emosteer")
    assert not routes_allowed(None) and not routes_allowed("") and not routes_allowed("emosteer2")


NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}


def test_speculative_decoding_whose_rows_only_the_gpu_knows_is_refused():
    """Adaptive verification (vLLM: dspark on Model Runner V2, which this machine cannot run) moves draft tokens
    between requests on the GPU: the host's rows would steer the wrong tokens. vLLM refuses it on V1 itself."""
    from types import SimpleNamespace

    from vllm_emosteer.engine.frontend.validation import speculative_problems

    plain = SimpleNamespace(capture=None)
    assert speculative_problems(None, plain) == []
    assert speculative_problems(SimpleNamespace(method="ngram"), plain) == []
    [problem] = speculative_problems(SimpleNamespace(method="dspark", enable_adaptive_verification=True), plain)
    assert "adaptive verification" in problem


@pytest.mark.parametrize(
    "engine_args, words",
    [
        ({"kv_sharing_fast_prefill": True}, "kv_sharing_fast_prefill runs the cross-decoder layers on one token"),
        ({"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
         "the KV connector ExampleConnector does not key KV by vLLM's block hashes"),
        ({"speculative_config": NGRAM, "enforce_eager": True, "enable_prefix_caching": False,
          "emosteer": {"capture": "attn_out"}}, "capture mode cannot run with speculative decoding"),
    ],
)
def test_features_the_plugin_cannot_steer_exactly_are_refused(tiny_llama, tiny_bank_path, engine_args, words):
    from vllm import LLM

    engine_args = dict(engine_args)
    options = dict({"vectors": str(tiny_bank_path)}, **engine_args.pop("emosteer", {}))
    with pytest.raises(ValueError, match=words):
        LLM(model=str(tiny_llama), additional_config={"emosteer": options}, **engine_args)
