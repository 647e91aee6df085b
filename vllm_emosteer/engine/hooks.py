"""Where the steering add goes in each supported architecture, and the forward hooks that put it there.

Hook points (the bank's `hook`):
* attn_out: the output of each decoder layer's self-attention module, before the residual add (the paper's).
* residual: the stream after the decoder layer. vLLM layers return (hidden, residual) whose sum is the
  stream; adding to `residual` adds to the stream (and keeps vLLM's fused add-norm patterns intact).

Hooks are registered after the weights load and before the first forward (profiling, compilation, graph
capture), so torch.compile traces them into the graph.
"""

from __future__ import annotations

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM")


class UnsupportedModelError(ValueError):
    pass


def check_architecture(architecture: str | None) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"emosteer cannot steer {architecture}: supported architectures are {list(SUPPORTED_ARCHITECTURES)}"
        )


def local_decoder_layers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layers present on this rank, by model layer index (pipeline ranks hold a slice)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"cannot find the decoder layers of {type(model).__name__}")
    start = getattr(inner, "start_layer", 0)
    end = getattr(inner, "end_layer", len(layers))
    return {i: layers[i] for i in range(start, end)}


def _steer(output, runtime, row: int):
    if runtime.options.mode == "naive":
        runtime.naive_add(output, row)
    elif torch.compiler.is_compiling():  # traced: the op, always, so that no host decision is frozen in a graph
        torch.ops.emosteer.steer_add_(output, runtime.rows.gpu, runtime.coeff.gpu, runtime.bank, row)
    else:  # an eager forward (or one captured into a CUDA graph without compilation): no dispatcher
        runtime.steer_eager(output, row)


def install_hooks(model: torch.nn.Module, runtime, hook: str, rows_by_layer: dict[int, int]) -> list:
    """Hook every local layer that has a bank row; returns the hook handles."""
    layers = local_decoder_layers(model)
    handles = []
    for layer_index, row in rows_by_layer.items():
        layer = layers.get(layer_index)
        if layer is None:
            continue
        if hook == "attn_out":
            def after_attention(_module, _args, output, row=row):
                if runtime.capture is not None:  # capture mode: the activation as the model made it
                    runtime.capture.add(output[0] if isinstance(output, tuple) else output, row)
                _steer(output[0] if isinstance(output, tuple) else output, runtime, row)
                return output

            handles.append(layer.self_attn.register_forward_hook(after_attention))
        else:
            def after_layer(_module, _args, output, row=row):
                if runtime.capture is not None:  # the stream is hidden + residual
                    runtime.capture.add(output[0] + output[1] if isinstance(output, tuple) else output, row)
                _steer(output[1] if isinstance(output, tuple) else output, runtime, row)
                return output

            handles.append(layer.register_forward_hook(after_layer))
    return handles
