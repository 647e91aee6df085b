"""Where the steering add goes in a model, found from the model's structure, and the forward hooks that put it there.

Hook points (the bank's `hook`):
* attn_out: the output of each decoder layer's attention module (`self_attn`, `attn` or `attention`), before
  anything the layer does with it (the paper's point). Extraction captures the same module's output, so the
  offset lands where the vectors were measured, also where the layer then normalises the output (Gemma 2/3,
  OLMo 2) or scales it (Granite's residual_multiplier).
* residual: the stream after the decoder layer. How a layer hands the stream on is read from the source of its
  forward (residual_kind), by whether it reads the `residual` it is given before it first assigns it:
  - it reads it (vLLM's pre-norm layers: Llama, Qwen, Gemma 2/3, DeepSeek, GPT-OSS, ...): it returns
    (hidden, residual) whose sum is the stream (the next layer's fused add-norm adds them); the add goes into
    `residual`, which keeps vLLM's fused add-norm patterns intact;
  - it overwrites it first (Command-R and Cohere2-MoE, Exaone 4, PhiMoE, MiniCPM, HyperCLOVAX, Gemma 4,
    GraniteMoeHybrid, Molmo's norm-after layers, ...): it returns (stream, x), x being its input, a mid-layer
    stream or None, which the next layer (overwriting it too) and the final norm never read; the add goes into
    the stream, the first;
  - its forward takes no `residual` (Granite, the Transformers backend, ...): it returns the stream itself.
  A forward that takes `residual` and does neither (it assigns it only conditionally before any read, or never
  mentions it), one whose source cannot be read, and a model whose layers mix the first kind with another (an
  offset in `residual` would reach a layer that ignores it) are refused.

Support is decided by structure, not by name: decoder layers at `model.model.layers` (vLLM's convention, and
its Transformers backend's), each with an attention module for attn_out, and hooked tensors of shape [T, H]
(the Transformers backend's [1, T, H] is steered as [T, H]). What does not fit is refused at start-up (structure
at load, shapes at the first forward) with one line naming the model class and what is missing.

Tensor parallel (decided by structure too, only where a row-parallel projection has tp_size > 1):
* An attention module whose output projection is a RowParallelLinear with reduce_results=False returns this
  rank's partial sum X_i A_i; the layer reduces it later (Command-R sums attention + MLP and all-reduces once;
  Falcon's parallel attention; DeepSeek-V2/V3 and Qwen3-Next with sequence-parallel MoE reduce-scatter it). The
  offset goes into rank 0's partial only, as vLLM adds a row-parallel bias on rank 0 only: summed in fp32 and
  rounded once into that partial, so the reduced activation gets it once (offset / tp on every rank would round
  tp times). Capture mode all-reduces a copy of the partial, so it records the full activation on every rank.
* Sequence-parallel MoE layers (DeepSeek-V2/V3's `use_sequence_parallel_moe`, Qwen3-Next's and its kin's
  `use_attn_reduce_scatter_for_moe`) leave the residual stream split across the ranks, [T / tp, H] each, from
  that layer on: residual is refused there (the rows would be other tokens). Their attention still sees every
  token (its input is all-gathered) and leaves a partial sum: attn_out is steered as above. MoE blocks that split
  the tokens inside themselves and all-gather before returning (GPT-OSS, Llama 4, Qwen3-MoE, ...) change nothing.

Hooks are registered after the weights load and before the first forward (profiling, compilation, graph
capture), so torch.compile traces them into the graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...model_layers import (ATTENTION_NAMES, HIDDEN_PLUS_RESIDUAL, STREAM, STREAM_AND_IGNORED, UnsupportedModelError,
                             attention_module, local_decoder_layers, residual_kind)
from .ops import steer_add_masked

if TYPE_CHECKING:
    from .runtime import SteeringRuntime

# vLLM's decoder-layer flags for a sequence-parallel residual stream (set only with TP > 1: ParallelConfig.
# use_sequence_parallel_moe needs expert parallel, TP > 1 and DP > 1 with an all-to-all backend that splits tokens)
SEQUENCE_PARALLEL_FLAGS = ("use_sequence_parallel_moe", "use_attn_reduce_scatter_for_moe")


def row_parallel_projections(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The module's (and its children's) row-parallel linears that are split across more than one rank."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    return {name: m for name, m in module.named_modules()
            if isinstance(m, RowParallelLinear) and getattr(m, "tp_size", 1) > 1}


def partial_sum_rank(attention: torch.nn.Module) -> int | None:
    """This rank's tensor-parallel rank when the attention module returns its partial sum (every row-parallel
    projection in it leaves the all-reduce to the caller), None when it returns the full activation."""
    projections = row_parallel_projections(attention).values()
    if projections and not any(p.reduce_results for p in projections):
        return next(iter(projections)).tp_rank
    return None


def sequence_parallel_from(layers: dict[int, torch.nn.Module]) -> int | None:
    """The first local layer after which the residual stream is split across tensor-parallel ranks, if any."""
    return next((i for i, layer in sorted(layers.items())
                 if any(getattr(layer, flag, False) is True for flag in SEQUENCE_PARALLEL_FLAGS)), None)


def hook_targets(model: torch.nn.Module, hook: str, layer_indices, dtype: torch.dtype) -> dict[int, torch.nn.Module]:
    """The module to hook for each local layer in `layer_indices`, or UnsupportedModelError naming what is missing."""
    layers = local_decoder_layers(model)
    split_from = sequence_parallel_from(layers) if hook == "residual" else None
    if hook == "residual":  # an offset in a layer's `residual` must reach a layer that reads it
        kinds = {i: residual_kind(layer, type(model).__name__) for i, layer in sorted(layers.items())}
        if HIDDEN_PLUS_RESIDUAL in kinds.values() and len(set(kinds.values())) > 1:
            first = next(i for i, kind in kinds.items() if kind == HIDDEN_PLUS_RESIDUAL)
            other = next(i for i, kind in kinds.items() if kind != HIDDEN_PLUS_RESIDUAL)
            raise UnsupportedModelError(
                f"emosteer cannot steer {type(model).__name__} at residual: its decoder layers hand the stream on "
                f"in different ways (layer {first}, {type(layers[first]).__name__}, returns {kinds[first]}; layer "
                f"{other}, {type(layers[other]).__name__}, returns {kinds[other]}); use attn_out"
            )
    targets = {}
    for index in layer_indices:
        layer = layers.get(index)
        if layer is None:
            continue
        if hook == "residual":
            if split_from is not None and index >= split_from:
                raise UnsupportedModelError(
                    f"emosteer cannot steer {type(model).__name__} at residual with sequence-parallel MoE: from "
                    f"decoder layer {split_from} ({type(layers[split_from]).__name__}) on, each tensor-parallel rank "
                    "holds a slice of the tokens' residual stream, not the batch; use attn_out"
                )
            if dtype == torch.float16 and getattr(layer, "routed_scaling_factor", 1.0) != 1.0:
                raise UnsupportedModelError(
                    f"emosteer cannot steer {type(model).__name__} at residual in float16: its layers divide the "
                    "residual stream by routed_scaling_factor (vLLM's float16 overflow guard), so the vectors "
                    "would land at the wrong scale; use attn_out or bfloat16"
                )
            targets[index] = layer
            continue
        attention = attention_module(layer)
        if attention is None:
            raise UnsupportedModelError(
                f"emosteer cannot steer {type(model).__name__} at attn_out: decoder layer {index} "
                f"({type(layer).__name__}) has no attention module ({', '.join(ATTENTION_NAMES)})"
            )
        projections = row_parallel_projections(attention)
        reduced = sorted(name for name, p in projections.items() if p.reduce_results)
        if reduced and len(reduced) < len(projections):
            unreduced = sorted(set(projections) - set(reduced))
            raise UnsupportedModelError(
                f"emosteer cannot steer {type(model).__name__} at attn_out under tensor parallel: the attention "
                f"module of decoder layer {index} ({type(attention).__name__}) all-reduces {', '.join(reduced)} but "
                f"not {', '.join(unreduced)}, so whether its output is the full activation is unknown"
            )
        targets[index] = attention
    return targets


def steered_tensor(output, hook: str, kind: str | None, hidden_size: int, model_name: str) -> torch.Tensor:
    """The [T, H] tensor of a hooked module's output that the offset goes into (`kind`: the layer's residual_kind,
    at the residual hook)."""
    if hook == "attn_out":  # vLLM's attention returns a tensor; a Transformers-backend one (output, weights)
        x = output[0] if isinstance(output, tuple) else output
        what = "attention output"
    elif kind in (HIDDEN_PLUS_RESIDUAL, STREAM_AND_IGNORED):
        if not (isinstance(output, tuple) and len(output) == 2):
            raise UnsupportedModelError(
                f"emosteer cannot steer {model_name} at residual: a decoder layer that takes `residual` "
                f"returned {type(output).__name__}, not {kind}"
            )
        x, what = (output[1], "residual") if kind == HIDDEN_PLUS_RESIDUAL else (output[0], "stream (first output)")
    else:
        x = output
        what = "decoder layer output"
    if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[0] == 1:  # vLLM's Transformers backend
        x = x[0]
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != hidden_size:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise UnsupportedModelError(
            f"emosteer cannot steer {model_name} at {hook}: the {what} is {shape}, not [tokens, {hidden_size}]"
        )
    return x


def _steer(x: torch.Tensor, runtime: SteeringRuntime, bank_row: int) -> None:
    if runtime.options.mode == "naive":
        runtime.naive_add(x, bank_row)
    elif torch.compiler.is_compiling():  # traced: the add, always, so that no host decision is frozen in a graph
        if x.device.type == "cuda":  # the op: Inductor sees the Triton kernel itself
            torch.ops.emosteer.steer_add_(x, runtime.row_of_token.gpu, runtime.coeff.gpu, runtime.device_vectors,
                                          bank_row)
        else:  # plain torch ops (mask and gather) that Inductor fuses; the host plan's per-slot table where it has one
            steer_add_masked(x, runtime.row_of_token.gpu, runtime.coeff.gpu, runtime.device_vectors, bank_row,
                             runtime.slot_offsets)
    else:  # an eager forward (or one captured into a CUDA graph without compilation): no dispatcher
        runtime.steer_eager(x, bank_row)


def install_hooks(model: torch.nn.Module, runtime: SteeringRuntime, hook: str,
                  bank_row_of_layer: dict[int, int], dtype: torch.dtype) -> list:
    """Hook every local layer that has a bank row; returns the hook handles. Structure is checked here (at load)
    and the hooked tensor's shape at every call; the plugin makes sure one forward runs at start-up."""
    targets = hook_targets(model, hook, bank_row_of_layer, dtype)
    layers = local_decoder_layers(model)
    hidden_size = runtime.device_vectors.shape[-1]
    model_name = type(model).__name__
    handles = []
    for layer_index, module in targets.items():
        kind = residual_kind(layers[layer_index], model_name) if hook == "residual" else None
        # a partial sum (see the module docstring): steered on rank 0 only, all-reduced (a copy) for capture
        rank = partial_sum_rank(module) if hook == "attn_out" else None
        if rank is not None and runtime.capture is not None:
            from vllm.distributed import tensor_model_parallel_all_reduce as all_reduce  # in place on CPU: a copy
        else:
            all_reduce = None

        def steer_output(_module, _args, output, bank_row=bank_row_of_layer[layer_index], kind=kind,
                         steer_here=rank in (None, 0), all_reduce=all_reduce):
            x = steered_tensor(output, hook, kind, hidden_size, model_name)
            if runtime.capture is not None:  # capture mode: the activation as the model made it (the whole stream)
                seen = output[0] + x if kind == HIDDEN_PLUS_RESIDUAL else x
                runtime.capture.add(all_reduce(seen.clone()) if all_reduce is not None else seen, bank_row)
            if steer_here:
                _steer(x, runtime, bank_row)
            runtime.hooks_ran = True
            return output

        handles.append(module.register_forward_hook(steer_output))
    return handles
