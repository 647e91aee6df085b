"""Model Runner V2 on a CPU-only machine, for the tests. vLLM's MRv2 needs Triton, and the PyPI `triton` has no CPU
backend. With TRITON_INTERPRET=1, Triton's interpreter runs MRv2's kernels (and the plugin's) on CPU tensors; vLLM
only has to believe Triton is usable: `install()` gives `triton.backends.backends` a stand-in "cpu" entry whose
driver is never active, which keeps `vllm.triton_utils.HAS_TRITON` True on vLLM's CPU build. It must run before vLLM
is imported, in every process: sitecustomize.py (beside this file, on PYTHONPATH) does it in the processes vLLM
starts, tests/conftest.py in the test process.

One difference from hardware is evened out: the interpreter's argmax is numpy's nanargmax, which raises on an
all-NaN row where a GPU returns an index. vLLM's start-up samples once from the logits of a dummy forward (whose
inputs may be uninitialised memory), so without this an engine can fail to start at random."""

import numpy as np


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
