"""Imported by Python at start-up in every process that has this folder on PYTHONPATH (tests/conftest.py puts it
there): under Triton's interpreter, vLLM's Model Runner V2 runs on the CPU (standin.py)."""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    import standin

    standin.install()
