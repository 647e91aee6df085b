"""The workers' wrappers on vLLM's V1 model runner and worker: each a short wrapper that calls a named function.

* load_model: build the steering runtime (buffers before profiling, compilation and graph capture) and hook the
  model (install_steering).
* execute_model: finished and preempted requests give their slots back.
* _preprocess (real batches only): fill the per-token rows and copy them to the device. It runs last inside
  `synchronize_input_prep`, the window in which vLLM may rewrite its reused pinned host buffers: with async
  scheduling, the next step waits there for this step's pending copies.
* compile_or_warm_up_model: one dummy forward where start-up ran none (CPU, eager), so that the hooks' shape check
  refuses a model at start rather than at its first request.
* WorkerBase gets the collective RPC methods (rpc.py); Model Runner V2 refuses to start (not supported yet).
"""

from __future__ import annotations

import logging

import numpy as np

from ..options import is_enabled, options_from_vllm_config
from ..vllm_internals import (RUNTIME_ATTR, TAKE_CAPTURES_RPC, UPDATE_SET_RPC, runtime_of, uses_cuda_graphs, wrap,
                              wrap_where_defined)
from ...model_layers import local_decoder_layers
from .hooks import install_hooks
from .rpc import take_captures_on_worker, update_set_on_worker
from .runtime import SteeringRuntime

logger = logging.getLogger("vllm.emosteer")


def install_steering(runner) -> None:
    """Build the steering state of a V1 model runner whose model has just loaded, and hook the model."""
    options = options_from_vllm_config(runner.vllm_config)
    runtime = SteeringRuntime(options, runner.max_num_tokens, runner.max_num_reqs, runner.device)
    # Hooks that run eagerly may decide on the host once per step (skip a step without steered tokens, no
    # per-layer nonzero on CPU); never where the forward is captured into a CUDA graph.
    runtime.host_plan = runner.device.type == "cpu" or not uses_cuda_graphs(runner.vllm_config)
    model = runner.get_model()
    runtime.register_buffers(model)
    bank_row_of_layer = {options.sets.layers[row]: row for row in options.steered_rows()}
    runtime.handles = install_hooks(model, runtime, options.sets.hook, bank_row_of_layer,
                                    runner.vllm_config.model_config.dtype)
    if not runtime.handles and runner.vllm_config.parallel_config.pipeline_parallel_size == 1:
        raise RuntimeError("emosteer: no layer could be hooked; refusing to run unsteered")
    if runtime.capture is not None:
        local = local_decoder_layers(model)
        runtime.capture.local_rows = [row for layer, row in bank_row_of_layer.items() if layer in local]
    setattr(runner, RUNTIME_ATTR, runtime)
    model.emosteer_runtime = runtime  # reachable from LLM.apply_model, for inspection
    path = "Triton kernel" if runner.device.type == "cuda" else "torch: host plan eager, mask and gather compiled"
    logger.info("emosteer: hooked %d layers at %s on %s (%s)", len(runtime.handles), options.sets.hook,
                runner.device, path)


def release_finished(runtime, scheduler_output) -> None:
    runtime.forget(scheduler_output.finished_req_ids)
    if scheduler_output.preempted_req_ids:
        runtime.forget(scheduler_output.preempted_req_ids, preempted=True)


def prepare_step(runner, runtime) -> None:
    """This step's per-token rows, from the runner's batch (requests in batch-row order)."""
    batch = runner.input_batch
    n = batch.num_reqs
    counts = np.diff(runner.query_start_loc.np[: n + 1])
    runtime.prepare(batch.req_ids[:n], runner.requests, counts, batch.num_computed_tokens_cpu[:n],
                    runner.query_pos.np)


def patch_v1_runner() -> list[str]:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make_load(original):
        def load_model(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if is_enabled(self.vllm_config):
                install_steering(self)
            return result

        return load_model

    def make_execute(original):
        def execute_model(self, scheduler_output, *args, **kwargs):
            runtime = runtime_of(self)
            if runtime is not None:
                release_finished(runtime, scheduler_output)
            return original(self, scheduler_output, *args, **kwargs)

        return execute_model

    def make_prepare(original):
        def wrapper(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            runtime = runtime_of(self)
            if runtime is not None:
                prepare_step(self, runtime)
            return result

        return wrapper

    # _preprocess runs last inside synchronize_input_prep (vLLM 0.32/0.33); _model_forward runs after it
    prepare_in = "_preprocess" if hasattr(GPUModelRunner, "_preprocess") else "_model_forward"
    return [*wrap_where_defined(GPUModelRunner, "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "load_model",
                                make_load),
            wrap(GPUModelRunner, "execute_model", make_execute), wrap(GPUModelRunner, prepare_in, make_prepare)]


def patch_warm_up() -> list[str]:
    from vllm.v1.worker.gpu_worker import Worker

    def make(original):
        def compile_or_warm_up_model(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            runtime = runtime_of(self)
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


def refuse_v2_runner() -> list[str]:
    """Model Runner V2 is not supported yet: refuse to start rather than run unsteered."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    except Exception:  # noqa: BLE001  not present in this build
        return []

    def make(original):
        def load_model(self, *args, **kwargs):
            if is_enabled(self.vllm_config):
                raise RuntimeError("emosteer: vLLM chose Model Runner V2, which emosteer does not support yet; "
                                   "set VLLM_USE_V2_MODEL_RUNNER=0")
            return original(self, *args, **kwargs)

        return load_model

    return [wrap(V2Runner, "load_model", make)]


def install() -> list[str]:
    from . import ops  # noqa: F401  registers torch.ops.emosteer.steer_add_

    return patch_v1_runner() + patch_warm_up() + add_worker_rpcs() + refuse_v2_runner()
