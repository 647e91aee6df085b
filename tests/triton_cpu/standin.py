"""Model Runner V2 on a CPU-only machine, for the tests. vLLM's MRv2 needs Triton, and the PyPI `triton` has no CPU
backend. With TRITON_INTERPRET=1, Triton's interpreter runs MRv2's kernels (and the plugin's) on CPU tensors; vLLM
only has to believe Triton is usable: `install()` gives `triton.backends.backends` a stand-in "cpu" entry whose
driver is never active, which keeps `vllm.triton_utils.HAS_TRITON` True on vLLM's CPU build. It must run before vLLM
is imported, in every process: sitecustomize.py (beside this file, on PYTHONPATH) does it in the processes vLLM
starts, tests/conftest.py in the test process."""


def install() -> None:
    try:
        from triton.backends import Backend, backends
    except ImportError:  # no Triton: nothing to stand in for
        return

    class InactiveDriver:
        @staticmethod
        def is_active() -> bool:
            return False

    backends.setdefault("cpu", Backend(compiler=None, driver=InactiveDriver))
