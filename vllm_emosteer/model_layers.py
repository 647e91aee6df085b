"""Where a model's layers are, found from its structure: the decoder layers (vLLM's convention, model.model.layers,
a slice on each pipeline rank), each layer's attention module, and how a layer hands the residual stream on. The
hooks (engine/worker/hooks.py) and extraction in transformers (extraction/extract.py) both use it.

What does not fit is an UnsupportedModelError naming the model class and what is missing.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import torch

ATTENTION_NAMES = ("self_attn", "attn", "attention")
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


# How a decoder layer hands the residual stream on (see the module docstring)
STREAM = "the stream"  # its forward takes no `residual`
HIDDEN_PLUS_RESIDUAL = "(hidden, residual) whose sum is the stream"  # it reads the `residual` it is given
STREAM_AND_IGNORED = "(stream, what the next layer ignores)"  # it overwrites `residual` before reading it


def residual_use(function: ast.FunctionDef | ast.AsyncFunctionDef, name: str = "residual") -> str | None:
    """How the top level of `function`'s body first uses its parameter `name`: "read" (a statement reads it before
    or without assigning it, also in an `if residual is None:` test or an augmented assignment), "overwritten" (an
    unconditional assignment that does not read it comes first), None (neither: its first mention is a conditional
    or other assignment, or it is never mentioned)."""
    for statement in function.body:
        reads = writes = False
        for node in ast.walk(statement):
            if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                reads = True
            elif isinstance(node, ast.Name) and node.id == name:
                reads |= isinstance(node.ctx, ast.Load)
                writes |= not isinstance(node.ctx, ast.Load)
        if reads:
            return "read"
        if writes:
            unconditional = isinstance(statement, ast.Assign) or (
                isinstance(statement, ast.AnnAssign) and statement.value is not None)
            return "overwritten" if unconditional else None
    return None


@functools.cache
def _forward_use(function) -> str:
    """residual_use of a forward function's source, or why it cannot be decided (cached per function)."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return "its source cannot be read"
    definition = tree.body[0] if tree.body else None
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return "its source is not a function definition"
    use = residual_use(definition)
    if use is None:
        return "it neither reads `residual` nor assigns it unconditionally before any read"
    return use


def residual_kind(layer: torch.nn.Module, model_name: str) -> str:
    """How the decoder layer hands the stream on (STREAM, HIDDEN_PLUS_RESIDUAL or STREAM_AND_IGNORED), decided from
    its forward's signature and source; UnsupportedModelError where that cannot be decided."""
    forward = layer.forward
    if "residual" not in inspect.signature(forward).parameters:
        return STREAM
    use = _forward_use(inspect.unwrap(getattr(forward, "__func__", forward)))
    if use == "read":
        return HIDDEN_PLUS_RESIDUAL
    if use == "overwritten":
        return STREAM_AND_IGNORED
    raise UnsupportedModelError(
        f"emosteer cannot steer {model_name} at residual: the forward of its decoder layer {type(layer).__name__} "
        f"takes `residual` but {use}, so whether the layer returns (hidden, residual) or the stream is unknown"
    )
