"""The workers' wrappers on vLLM: the runner seams (v1_runner.py, v2_runner.py), and on the worker:

* compile_or_warm_up_model: refuse to start when steering is on but the worker's model runner is none the seams
  hook (e.g. vLLM 0.34's standalone CPU runner, on CPUs without Triton); one dummy forward where start-up ran none
  (CPU, eager), so that the hooks' shape check refuses a model at start rather than at its first request.
* WorkerBase gets the collective RPC methods (rpc.py).
"""

from __future__ import annotations

from ..options import is_enabled
from ..vllm_internals import TAKE_CAPTURES_RPC, UPDATE_SET_RPC, runtime_of, wrap_where_defined
from . import v1_runner, v2_runner
from .rpc import take_captures_on_worker, update_set_on_worker


def patch_warm_up() -> list[str]:
    from vllm.v1.worker.gpu_worker import Worker

    def make(original):
        def compile_or_warm_up_model(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            runtime = runtime_of(self)
            if runtime is None and is_enabled(self.vllm_config):
                raise RuntimeError(f"emosteer: steering is on, but this worker runs vLLM's "
                                   f"{type(self.model_runner).__qualname__} ({type(self.model_runner).__module__}), "
                                   "a model runner the plugin does not hook; refusing to run unsteered")
            if runtime is not None and runtime.handles and not runtime.hooks_ran:
                self.model_runner._dummy_run(2)  # 2 tokens: a [T, 1, H] output must not pass as [1, T, H]
            return result

        return compile_or_warm_up_model

    return wrap_where_defined(Worker, "vllm.v1.worker.cpu_worker", "CPUWorker", "compile_or_warm_up_model", make)


def add_worker_rpcs() -> list[str]:
    from vllm.v1.worker.worker_base import WorkerBase

    for name, method in ((UPDATE_SET_RPC, update_set_on_worker), (TAKE_CAPTURES_RPC, take_captures_on_worker)):
        if not hasattr(WorkerBase, name):
            setattr(WorkerBase, name, method)
    return [f"WorkerBase.{UPDATE_SET_RPC}", f"WorkerBase.{TAKE_CAPTURES_RPC}"]


def install() -> list[str]:
    from . import ops  # noqa: F401  registers torch.ops.emosteer.steer_add_

    seams = v1_runner.install() + v2_runner.install()
    if not seams:
        raise RuntimeError("emosteer: this vLLM has neither model runner the plugin knows (V1 or Model Runner V2)")
    return seams + patch_warm_up() + add_worker_rpcs()
