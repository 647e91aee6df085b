"""`GET /v1/emosteer`: what a steering server offers (emotions, layers, intensity limit, calibration).

A `vllm.endpoint_plugins` entry point. vLLM loads endpoint plugins only when they are named in VLLM_PLUGINS:
start the server with `VLLM_PLUGINS=emosteer` (the name also allows the general plugin of the same name).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

ROUTE = "/v1/emosteer"


class EmosteerEndpoint:
    name = "emosteer"
    required_tasks = ("generate",)

    def __init__(self):
        self.info: dict | None = None

    def attach_router(self, app: FastAPI) -> None:
        @app.get(ROUTE)
        async def emosteer_info():
            if self.info is None:
                return JSONResponse({"enabled": False, "message": "steering is not enabled on this server; start "
                                     "it with --additional-config '{\"emosteer\": {}}'"}, status_code=404)
            return JSONResponse(self.info)

    async def init_state(self, engine_client, state, args) -> None:
        from ..engine.options import is_enabled, options_from_vllm_config

        config = getattr(engine_client, "vllm_config", None)
        if config is not None and is_enabled(config):
            self.info = {"enabled": True, **options_from_vllm_config(config).describe()}
