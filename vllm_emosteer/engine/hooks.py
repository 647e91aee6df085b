"""Where the steering add goes in a model, found from the model's structure, and the forward hooks that put it there.

Hook points (the bank's `hook`):
* attn_out: the output of each decoder layer's attention module (`self_attn`, `attn` or `attention`), before
  anything the layer does with it (the paper's point). Extraction captures the same module's output, so the
  offset lands where the vectors were measured, also where the layer then normalises the output (Gemma 2/3,
  OLMo 2) or scales it (Granite's residual_multiplier).
* residual: the stream after the decoder layer. A layer whose forward takes `residual` returns
  (hidden, residual) whose sum is the stream (the next layer's fused add-norm adds them); the add goes into
  `residual`, which keeps vLLM's fused add-norm patterns intact. A layer without it returns the stream itself.

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

import inspect

import torch

ATTENTION_NAMES = ("self_attn", "attn", "attention")
# vLLM's decoder-layer flags for a sequence-parallel residual stream (set only with TP > 1: ParallelConfig.
# use_sequence_parallel_moe needs expert parallel, TP > 1 and DP > 1 with an all-to-all backend that splits tokens)
SEQUENCE_PARALLEL_FLAGS = ("use_sequence_parallel_moe", "use_attn_reduce_scatter_for_moe")


class UnsupportedModelError(ValueError):
    pass


def local_decoder_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layers present on this rank, by model layer index (pipeline ranks hold a slice)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UnsupportedModelError(
            f"emosteer cannot steer {type(model).__name__}: it has no decoder layers at model.model.layers"
        )
    inner = model.model
    start = getattr(inner, "start_layer", 0)
    end = getattr(inner, "end_layer", len(layers))
    return {i: layers[i] for i in range(start, end)}


def attention_module(layer: torch.nn.Module) -> torch.nn.Module | None:
    for name in ATTENTION_NAMES:
        module = getattr(layer, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def returns_residual(layer: torch.nn.Module) -> bool:
    """vLLM's pre-norm layers take the residual and return (hidden, residual); the others return the stream."""
    return "residual" in inspect.signature(layer.forward).parameters


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


def steered_tensor(output, hook: str, with_residual: bool, hidden_size: int, model_name: str) -> torch.Tensor:
    """The [T, H] tensor of a hooked module's output that the offset goes into."""
    if hook == "attn_out":  # vLLM's attention returns a tensor; a Transformers-backend one (output, weights)
        x = output[0] if isinstance(output, tuple) else output
        what = "attention output"
    elif with_residual:
        if not (isinstance(output, tuple) and len(output) == 2):
            raise UnsupportedModelError(
                f"emosteer cannot steer {model_name} at residual: a decoder layer that takes `residual` "
                f"returned {type(output).__name__}, not (hidden, residual)"
            )
        x = output[1]
        what = "residual"
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


def _steer(x, runtime, row: int):
    if runtime.options.mode == "naive":
        runtime.naive_add(x, row)
    elif torch.compiler.is_compiling():  # traced: the op, always, so that no host decision is frozen in a graph
        torch.ops.emosteer.steer_add_(x, runtime.rows.gpu, runtime.coeff.gpu, runtime.bank, row)
    else:  # an eager forward (or one captured into a CUDA graph without compilation): no dispatcher
        runtime.steer_eager(x, row)


def install_hooks(model: torch.nn.Module, runtime, hook: str, rows_by_layer: dict[int, int],
                  dtype: torch.dtype) -> list:
    """Hook every local layer that has a bank row; returns the hook handles. Structure is checked here (at load)
    and the hooked tensor's shape at every call; the plugin makes sure one forward runs at start-up."""
    targets = hook_targets(model, hook, rows_by_layer, dtype)
    layers = local_decoder_layers(model)
    hidden_size = runtime.bank.shape[-1]
    model_name = type(model).__name__
    handles = []
    for layer_index, module in targets.items():
        with_residual = hook == "residual" and returns_residual(layers[layer_index])
        # a partial sum (see the module docstring): steered on rank 0 only, all-reduced (a copy) for capture
        rank = partial_sum_rank(module) if hook == "attn_out" else None
        if rank is not None and runtime.capture is not None:
            from vllm.distributed import tensor_model_parallel_all_reduce as all_reduce  # in place on CPU: a copy
        else:
            all_reduce = None

        def steer_output(_module, _args, output, row=rows_by_layer[layer_index], with_residual=with_residual,
                         steer_here=rank in (None, 0), all_reduce=all_reduce):
            x = steered_tensor(output, hook, with_residual, hidden_size, model_name)
            if runtime.capture is not None:  # capture mode: the activation as the model made it (the whole stream)
                seen = output[0] + x if with_residual else x
                runtime.capture.add(all_reduce(seen.clone()) if all_reduce is not None else seen, row)
            if steer_here:
                _steer(x, runtime, row)
            runtime.hooks_ran = True
            return output

        handles.append(module.register_forward_hook(steer_output))
    return handles
