"""The plugin's HTTP routes, beside vLLM's OpenAI API:

    GET    /v1/emosteer              what this server's steering offers (emotions, layers, limits, vector sets)
    POST   /v1/emosteer/sets         {"name": ..., "file": ..., "replace": false}: load a vector set at run time
    DELETE /v1/emosteer/sets/{name}  unload one
    GET    /emosteer                 the playground page (playground.py)

Runtime changes need VLLM_EMOSTEER_ALLOW_RUNTIME_UPDATES=1 and one API server; loads also need the `sets_dir` option
(engine/frontend/set_changes.py). A `vllm.endpoint_plugins` entry point: vLLM loads endpoint plugins only when
VLLM_PLUGINS names them, which `vllm-emosteer serve` sees to (serve.py).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .playground import attach_playground

logger = logging.getLogger("vllm.emosteer")
ROUTE = "/v1/emosteer"
NOT_ENABLED = {"enabled": False, "message": "steering is not enabled on this server; start it with "
               "--additional-config '{\"emosteer\": {}}'"}


def _error(status: int, message: str, parameter: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "BadRequestError" if status == 400 else "EmosteerSetError",
                      "param": parameter, "code": status}}
    return JSONResponse(body, status_code=status)


def _failure(exc: Exception, action: str) -> JSONResponse:
    """A refused change (SetUpdateError: its own status), or an unexpected failure: 500, logged and counted."""
    from ..engine.frontend.set_changes import SetUpdateError
    from ..engine import metrics

    if isinstance(exc, SetUpdateError):
        return _error(exc.status, str(exc))
    logger.exception("emosteer: %s of a vector set failed", action)
    metrics.count_set_update(action, "failed")
    return _error(500, f"emosteer: {action} failed: {type(exc).__name__}: {exc}")


class EmosteerEndpoint:
    name = "emosteer"
    required_tasks = ("generate",)

    def __init__(self):
        self.engine_client = None
        self.options = None
        self.api_servers = 1

    def attach_router(self, app: FastAPI) -> None:
        @app.get(ROUTE)
        async def emosteer_info():
            if self.options is None:
                return JSONResponse(NOT_ENABLED, status_code=404)
            return JSONResponse({"enabled": True, "runtime_updates": _runtime_updates(self),
                                 **self.options.describe()})

        @app.post(ROUTE + "/sets")
        async def load_set(request: Request):
            from ..engine.frontend.set_changes import load_set_async

            if self.options is None:
                return JSONResponse(NOT_ENABLED, status_code=404)
            try:
                body = await request.json()
            except ValueError:
                return _error(400, "the body must be a JSON object {\"name\": ..., \"file\": ...}")
            if not isinstance(body, dict) or set(body) - {"name", "file", "replace"}:
                return _error(400, "the body must be a JSON object with 'name', 'file' and optionally 'replace'")
            if not isinstance(body.get("replace", False), bool):
                return _error(400, "'replace' must be true or false", "replace")
            try:
                described = await load_set_async(self.engine_client, body.get("name"), body.get("file"),
                                                 body.get("replace", False))
            except Exception as exc:  # noqa: BLE001  a failure of ours is a 5xx with its reason, never a crash
                return _failure(exc, "load")
            return JSONResponse(described)

        @app.delete(ROUTE + "/sets/{name}")
        async def unload_set(name: str):
            from ..engine.frontend.set_changes import unload_set_async

            if self.options is None:
                return JSONResponse(NOT_ENABLED, status_code=404)
            try:
                await unload_set_async(self.engine_client, name)
            except Exception as exc:  # noqa: BLE001
                return _failure(exc, "unload")
            return JSONResponse({"unloaded": name})

        attach_playground(app, self.refusal)

    def refusal(self) -> JSONResponse | None:
        """The 404 every route answers while steering is off."""
        return JSONResponse(NOT_ENABLED, status_code=404) if self.options is None else None

    async def init_state(self, engine_client, state, args) -> None:
        from ..engine import metrics
        from ..engine.options import frontend_options, is_enabled
        from ..engine.vllm_internals import api_server_count

        processor = getattr(engine_client, "input_processor", None)
        if processor is not None and is_enabled(processor.vllm_config):
            self.engine_client = engine_client
            self.options = frontend_options(processor)
            self.api_servers = api_server_count(processor.vllm_config)
            metrics.SETS_LOADED.set(len(self.options.sets.by_name))


def _runtime_updates(endpoint: EmosteerEndpoint) -> dict:
    """What a client may change at run time: loads need the flag and sets_dir, unloads only the flag; neither
    with several API servers."""
    import os

    from ..engine.frontend.set_changes import ALLOW_ENV

    allowed = os.environ.get(ALLOW_ENV) == "1" and endpoint.api_servers == 1
    return {"load": allowed and endpoint.options.sets_dir is not None, "unload": allowed}
