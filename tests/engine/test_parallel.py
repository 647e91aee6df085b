"""Steering under vLLM's distributed execution on CPU: tensor parallel 2 and pipeline parallel 2 (multiprocessing
executor) equal one process; the plugin inside a Ray actor (vLLM's CPU platform has no Ray executor). Activations
that are not the full activation on every rank: Command-R's attention output is each rank's partial sum (steered
once, on rank 0); sequence-parallel MoE splits the residual stream across ranks (refused)."""

import functools
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import probes
import pytest
import torch
from conftest import EMOTIONS, TINY_HIDDEN, TINY_LAYERS, make_tiny_bank, make_tiny_model
from engine_helpers import params, prompt, shutdown, tiny_llm, tokens_and_logprobs

from vllm_emosteer import load_set, steer
from vllm_emosteer.engine.frontend.set_changes import ALLOW_ENV
from vllm_emosteer.vectors.bank import EmotionBank

SPECS = [None, steer(joy=1.0), steer(anger=0.5, fear=0.5, positions="all"), steer(sadness=1.5, layers=(2, 3))]
PROMPTS = [prompt(18 + 5 * i, 300 + i) for i in range(len(SPECS))]


def generate(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, [params(s, logprobs=None) for s in SPECS])]


@pytest.fixture(scope="module")
def single(tiny_llama, tiny_bank_path):
    llm = tiny_llm(tiny_llama, tiny_bank_path)
    outputs = generate(llm)
    shutdown(llm)
    assert outputs[0] != outputs[1]
    return outputs


def generate_with_a_runtime_set(llm, bank_path, monkeypatch):
    """Load the same vectors again as another set (an RPC to every rank) and steer with it."""
    monkeypatch.setenv(ALLOW_ENV, "1")
    load_set(llm, "again", bank_path.name)
    specs = [s if s is None else {"emosteer": dict(s["emosteer"], set="again")} for s in SPECS]
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, [params(s, logprobs=None) for s in specs])]


def with_room(bank_path):
    return {"max_sets": 2, "sets_dir": str(bank_path.parent)}


@pytest.fixture
def two_cpu_workers(monkeypatch):
    # vLLM's CPU workers bind OpenMP threads to NUMA nodes; with one node, bind one core each by hand
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    return monkeypatch


def test_tensor_parallel_2_equals_single_process(tiny_llama, tiny_bank_path, single, two_cpu_workers):
    llm = tiny_llm(tiny_llama, tiny_bank_path, options=with_room(tiny_bank_path), tensor_parallel_size=2,
                   distributed_executor_backend="mp")
    try:
        assert generate(llm) == single
        assert generate_with_a_runtime_set(llm, tiny_bank_path, two_cpu_workers) == single
    finally:
        shutdown(llm)


def test_pipeline_parallel_2_equals_single_process(tiny_llama, tiny_bank_path, single, two_cpu_workers):
    # each rank hooks only its own layers; eager PP fails in vLLM 0.32's CPU runner without the plugin too
    # (intermediate tensors are allocated by the compile warm-up), so this runs compiled
    llm = tiny_llm(tiny_llama, tiny_bank_path, options=with_room(tiny_bank_path), pipeline_parallel_size=2,
                   distributed_executor_backend="mp", enforce_eager=False)
    try:
        assert generate(llm) == single
        # compiled graphs read the bank in place: a set loaded after compilation steers them too
        assert generate_with_a_runtime_set(llm, tiny_bank_path, two_cpu_workers) == single
    finally:
        shutdown(llm)


def test_plugin_inside_a_ray_actor(tiny_llama, tiny_bank_path, single):
    ray = pytest.importorskip("ray")
    started_here = not ray.is_initialized()
    if started_here:  # .ci/run starts a local Ray instance (RAY_ADDRESS); without one, start one here
        env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k in ("PYTHONPATH", "HF_HUB_OFFLINE")}
        # the actor's class lives in this module: its workers import it by name from this folder
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address or None, num_cpus=None if address else 2, include_dashboard=False,
                 runtime_env={"env_vars": env})

    @ray.remote(num_cpus=1)
    class SteeredEngine:
        def __init__(self, model, vectors):
            self.llm = tiny_llm(model, vectors)

        def generate(self):
            return generate(self.llm)

    try:
        actor = SteeredEngine.remote(str(tiny_llama), str(tiny_bank_path))
        assert ray.get(actor.generate.remote(), timeout=600) == single
        ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()


# ---- partial sums: Command-R reduces attention + MLP once, after both (vLLM's commandr.py) ---------------------
@pytest.fixture(scope="module")
def tiny_cohere(tmp_path_factory, default_model_dir):
    from transformers import CohereConfig

    config = CohereConfig(hidden_size=TINY_HIDDEN, intermediate_size=256, num_hidden_layers=TINY_LAYERS,
                          num_attention_heads=2, num_key_value_heads=1, vocab_size=49152,  # head_dim 128 / 2 = 64
                          max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-cohere"), "CohereForCausalLM", default_model_dir,
                            config=config)
    vectors = tmp_path_factory.mktemp("cohere-banks") / "cohere.safetensors"
    make_tiny_bank(model, vectors, hook="attn_out", scale=1.0)
    return model, vectors


def cohere_generate(llm, prompts, specs):
    return [tokens_and_logprobs(o) for o in llm.generate(prompts, [params(s, max_tokens=6) for s in specs])]


def test_tensor_parallel_2_steers_partial_attention_sums_once(tiny_cohere, two_cpu_workers):
    """Command-R's o_proj leaves each rank's partial sum unreduced (the layer all-reduces attention + MLP once):
    the offset goes into rank 0's partial only, as vLLM's row-parallel bias does. Checked on the hooked tensor of
    each rank, against the test's own offset added to the layers' (all-reduced) output, and in capture mode
    (extraction) against transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from tqdm.auto import tqdm

    from vllm_emosteer.extraction.extract import Sample, mean_activations
    from vllm_emosteer.extraction.vllm_capture import VllmExtractor

    model, vectors = tiny_cohere
    bank = EmotionBank.load(vectors)
    mix = {"joy": 1.0, "anger": -0.5}
    offsets = [sum(v * bank.vectors[layer, EMOTIONS.index(e)] for e, v in mix.items()) for layer in range(TINY_LAYERS)]
    prompts = [prompt(30, 1), prompt(45, 2)]
    specs = [steer(positions="all", **mix)] * 2
    attention = [f"model.layers.{i}.self_attn" for i in range(TINY_LAYERS)]
    llm = tiny_llm(model, vectors, options={"capture": "attn_out"}, enable_prefix_caching=False,
                   tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        plain = cohere_generate(llm, prompts, [None, None])
        steered = cohere_generate(llm, prompts, specs)
        assert steered != plain
        # the layer's output is the all-reduced stream: the same offset added there, on every rank
        llm.apply_model(functools.partial(probes.add_reference_offsets, offsets=offsets, index=0,
                                          module_names=[f"model.layers.{i}" for i in range(TINY_LAYERS)]))
        try:
            reference = cohere_generate(llm, prompts, [None, None])
        finally:
            llm.apply_model(probes.remove_reference_offsets)
        for (ids_s, lp_s), (ids_r, lp_r) in zip(steered, reference):
            assert ids_s == ids_r
            np.testing.assert_allclose(lp_s, lp_r, atol=1e-4)
        llm.apply_model(functools.partial(probes.capture_deltas, module_names=attention, index=0))
        try:
            cohere_generate(llm, prompts, specs)
            rank0, rank1 = [pickle.loads(worker) for worker in llm.apply_model(probes.take_deltas)]  # rank order
        finally:
            llm.apply_model(probes.remove_capture)
        assert len(rank0) == len(rank1) >= TINY_LAYERS
        for (name, before, after), (_, before1, after1) in zip(rank0, rank1):
            assert torch.equal(after, (before.float() + offsets[attention.index(name)]).to(before.dtype)), name
            assert torch.equal(after1, before1), name  # rank 1's partial sum untouched
        # capture mode: the full attention output (all-reduced), on the rank that answers and the others
        rng = np.random.default_rng(0)
        batch = [Sample("joy", "emotional", f"q{i}", rng.integers(100, 40000, n).tolist(),
                        rng.integers(100, 40000, m).tolist()) for i, (n, m) in enumerate([(3, 5), (20, 12), (70, 9)])]
        engine = SimpleNamespace(llm=llm, config=AutoConfig.from_pretrained(model))
        means, _ = VllmExtractor.capture(engine, batch, "attn_out", 4, tqdm(total=1, disable=True))
    finally:
        shutdown(llm)
    reference_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    expected, _ = mean_activations(reference_model, batch, "attn_out", 4, tqdm(disable=True))
    torch.testing.assert_close(means, expected, rtol=1e-4, atol=1e-4)


# ---- sequence-parallel MoE: structure only (it needs expert parallel, TP > 1 and DP > 1: no CPU engine runs it) --
def row_parallel(reduce_results, tp_rank=1, tp_size=2):
    """A RowParallelLinear as vLLM builds it under TP (no weights: only what the plugin reads)."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    projection = RowParallelLinear.__new__(RowParallelLinear)
    torch.nn.Module.__init__(projection)
    projection.reduce_results, projection.tp_rank, projection.tp_size = reduce_results, tp_rank, tp_size
    return projection


def deepseek_like(first_moe_layer, flag="use_sequence_parallel_moe"):
    """DeepSeek-V2/V3 with sequence-parallel MoE (deepseek_v2.py DeepseekV2DecoderLayer): the MoE layers'
    attention leaves its partial sum to the layer's reduce-scatter, which splits the residual stream."""
    class DeepseekLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList()
            for i in range(4):
                layer = torch.nn.Module()
                setattr(layer, flag, i >= first_moe_layer)
                layer.self_attn = torch.nn.Module()
                layer.self_attn.o_proj = row_parallel(reduce_results=i < first_moe_layer)
                self.model.layers.append(layer)

    return DeepseekLike()


def test_sequence_parallel_residual_is_refused_and_its_attention_steered_on_rank_0():
    from vllm_emosteer.engine.worker.hooks import UnsupportedModelError, hook_targets, partial_sum_rank

    model = deepseek_like(first_moe_layer=2)
    assert list(hook_targets(model, "residual", [0, 1], torch.bfloat16)) == [0, 1]  # before the split: whole
    with pytest.raises(UnsupportedModelError, match=r"^emosteer cannot steer DeepseekLike at residual with "
                       r"sequence-parallel MoE: from decoder layer 2 \(Module\) on, each tensor-parallel rank holds "
                       r"a slice of the tokens' residual stream, not the batch; use attn_out$"):
        hook_targets(model, "residual", range(4), torch.bfloat16)
    attention = hook_targets(model, "attn_out", range(4), torch.bfloat16)
    assert [partial_sum_rank(attention[i]) for i in range(4)] == [None, None, 1, 1]  # rank 1: not steered
    qwen3_next_like = deepseek_like(first_moe_layer=0, flag="use_attn_reduce_scatter_for_moe")
    with pytest.raises(UnsupportedModelError, match="at residual with sequence-parallel MoE: from decoder layer 0"):
        hook_targets(qwen3_next_like, "residual", [3], torch.bfloat16)
    qwen3_next_like.model.layers[1].self_attn.out_proj = row_parallel(reduce_results=True)
    with pytest.raises(UnsupportedModelError, match=r"^emosteer cannot steer DeepseekLike at attn_out under tensor "
                       r"parallel: the attention module of decoder layer 1 \(Module\) all-reduces out_proj but not "
                       r"o_proj, so whether its output is the full activation is unknown$"):
        hook_targets(qwen3_next_like, "attn_out", [0, 1], torch.bfloat16)


def test_vllm_layers_that_split_the_stream_set_a_flag_the_plugin_reads():
    """Every vLLM decoder layer whose forward reduce-scatters (splits the stream across ranks) sets one of the
    flags that the plugin reads, so that a new one is not steered at the wrong rows unnoticed."""
    import ast
    import importlib.util
    from pathlib import Path

    from vllm_emosteer.engine.worker.hooks import SEQUENCE_PARALLEL_FLAGS

    models = Path(importlib.util.find_spec("vllm").origin).parent / "model_executor" / "models"
    splitting = {}
    for path in sorted(models.glob("*.py")):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
            calls = {getattr(c.func, "id", getattr(c.func, "attr", None))
                     for c in ast.walk(methods.get("forward", ast.Pass())) if isinstance(c, ast.Call)}
            if "tensor_model_parallel_reduce_scatter" in calls:
                flags = {t.attr for a in ast.walk(methods["__init__"]) if isinstance(a, ast.Assign)
                         for t in a.targets if isinstance(t, ast.Attribute)}
                splitting[f"{path.stem}.{cls.name}"] = flags & set(SEQUENCE_PARALLEL_FLAGS)
    assert "deepseek_v2.DeepseekV2DecoderLayer" in splitting and "qwen3_next.Qwen3NextDecoderLayer" in splitting
    assert all(splitting.values()), splitting
