"""The vLLM general plugin: `register()` runs in every vLLM process (front-end, engine core, workers, Ray actors).

It wraps vLLM methods (vllm_internals.py names every one) for the front-end (frontend/patches.py), the engine
core (admission.py, prefix_cache.py) and the workers (worker/patches.py). Each wrapper does nothing unless the engine's
`additional_config` has an "emosteer" entry, so installing the package changes nothing by itself.
"""

from __future__ import annotations

import logging

from . import admission, prefix_cache
from .frontend import patches as frontend_patches
from .vllm_internals import version_status
from .worker import patches as worker_patches

logger = logging.getLogger("vllm.emosteer")  # a child of "vllm": vLLM's log handlers and level apply
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    known, status = version_status()
    if not known:
        logger.warning("emosteer: %s", status)
    patched = frontend_patches.install() + admission.install() + prefix_cache.install() + worker_patches.install()
    _installed = True
    logger.debug("emosteer: wrapped %s", ", ".join(patched))
