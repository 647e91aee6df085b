"""Model Runner V2 on a CPU-only machine, for the tests. vLLM's MRv2 needs Triton, and the PyPI `triton` has no CPU
backend. With TRITON_INTERPRET=1, Triton's interpreter runs MRv2's kernels (and the plugin's) on CPU tensors; vLLM
only has to believe Triton is usable: `install()` gives `triton.backends.backends` a stand-in "cpu" entry whose
driver is never active, which keeps `vllm.triton_utils.HAS_TRITON` True on vLLM's CPU build. It must run before vLLM
is imported, in every process: sitecustomize.py (beside this file, on PYTHONPATH) does it in the processes vLLM
starts, tests/conftest.py in the test process.

Three differences from hardware are evened out:
* the interpreter's argmax is numpy's nanargmax, which raises on an all-NaN row where a GPU returns an index. vLLM's
  start-up samples once from the logits of a dummy forward (whose inputs may be uninitialised memory), so without
  this an engine can fail to start at random;
* the interpreter casts float32 to bfloat16 by truncation, where hardware (and `tl.cast`'s default) rounds to the
  nearest even: a bf16 kernel would differ from the same kernel on a GPU in the last bit;
* a mask built with `&` from a block and a scalar comparison (vLLM's n-gram speculator, the grammar bitmask) reaches
  the interpreter's load and store as int64 data, which they refuse ("mask has unsupported dtype"); on hardware a
  mask is always one bit."""

import numpy as np
import torch


class _HardwareArgmax:
    """numpy for Triton's interpreter, with an argmax / argmin that return an index on all-NaN rows (NaN skipped,
    leftmost on ties, as nanargmax)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def nanargmax(data, axis=None, keepdims=False):
        return np.argmax(np.where(np.isnan(data), -np.inf, data), axis=axis, keepdims=keepdims)

    @staticmethod
    def nanargmin(data, axis=None, keepdims=False):
        return np.argmin(np.where(np.isnan(data), np.inf, data), axis=axis, keepdims=keepdims)


def _rounding_to_nearest_even(convert_float):
    from triton.language import bfloat16, float32

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == float32 and output_dtype == bfloat16 and rounding_mode in (None, _rtne()):
            as_float = torch.from_numpy(np.ascontiguousarray(data).view(np.float32))
            return as_float.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return convert_float(data, input_dtype, output_dtype, rounding_mode)

    return convert


def _boolean_masks(builder) -> None:
    load, store = builder.create_masked_load, builder.create_masked_store

    def as_bool(mask):
        return mask if mask.data.dtype == np.bool_ else type(mask)(mask.data != 0, mask.dtype)

    def create_masked_load(self, ptrs, mask, *args):
        return load(self, ptrs, as_bool(mask), *args)

    def create_masked_store(self, ptrs, value, mask, *args):
        return store(self, ptrs, value, as_bool(mask), *args)

    builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
    builder.masks_are_boolean = True


def _rtne():
    from triton._C.libtriton import ir

    return ir.ROUNDING_MODE.RTNE


def install() -> None:
    try:
        from triton.backends import Backend, backends
        from triton.runtime import interpreter
    except ImportError:  # no Triton: nothing to stand in for
        return

    class InactiveDriver:
        @staticmethod
        def is_active() -> bool:
            return False

    backends.setdefault("cpu", Backend(compiler=None, driver=InactiveDriver))
    interpreter.np = _HardwareArgmax()
    if not getattr(interpreter._convert_float, "rounds_to_nearest_even", False):
        interpreter._convert_float = _rounding_to_nearest_even(interpreter._convert_float)
        interpreter._convert_float.rounds_to_nearest_even = True
    if not getattr(interpreter.InterpreterBuilder, "masks_are_boolean", False):
        _boolean_masks(interpreter.InterpreterBuilder)
