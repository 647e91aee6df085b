"""The vLLM general plugin: `register()` runs in every vLLM process (front-end, engine core, workers, Ray actors).

It wraps vLLM methods (vllm_internals.py names every one) for the front-end (frontend/patches.py), the engine
core (prefix_cache.py) and the workers (worker/patches.py). Each wrapper does nothing unless the engine's
`additional_config` has an "emosteer" entry, so installing the package changes nothing by itself.
"""

from __future__ import annotations

import logging

from . import prefix_cache
from .frontend import patches as frontend_patches
from .vllm_internals import CHECKED_VERSIONS, RUN_VERSIONS, vllm_version
from .worker import patches as worker_patches

logger = logging.getLogger("vllm.emosteer")  # a child of "vllm": vLLM's log handlers and level apply
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    version = vllm_version()
    if version.startswith(CHECKED_VERSIONS):
        logger.info("emosteer: vLLM %s: the plugin's vLLM internals were checked in its sources (conformance); its "
                    "tests run vLLM %s", version, " and ".join(RUN_VERSIONS))
    elif not version.startswith(RUN_VERSIONS):
        logger.warning("emosteer: vLLM %s was neither run nor checked; the plugin's tests run vLLM %s and its "
                       "conformance check read %s", version, " and ".join(RUN_VERSIONS), " and ".join(CHECKED_VERSIONS))
    patched = frontend_patches.install() + prefix_cache.install() + worker_patches.install()
    _installed = True
    logger.debug("emosteer: wrapped %s", ", ".join(patched))
