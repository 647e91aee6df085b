"""What both runner seams do with the steering runtime: build it when the model has loaded, and free the slots of
requests that ended. A seam (v1_runner.py, v2_runner.py) only says when, and where the batch's facts are."""

from __future__ import annotations

import logging

from ..options import options_from_vllm_config
from ..vllm_internals import RUNTIME_ATTR, runner_name, uses_cuda_graphs
from ...model_layers import local_decoder_layers
from .hooks import install_hooks
from .ops import kernel_runs_on
from .runtime import SteeringRuntime

logger = logging.getLogger("vllm.emosteer")


def install_steering(runner) -> None:
    """Build the steering state of a model runner whose model has just loaded, and hook the model."""
    config = runner.vllm_config
    options = options_from_vllm_config(config)
    runtime = SteeringRuntime(options, runner.max_num_tokens, runner.max_num_reqs, runner.device,
                              getattr(config, "max_concurrent_batches", 2))
    # Hooks that run eagerly may decide on the host once per step (skip a step without steered tokens, no
    # per-layer nonzero on CPU); never where the forward is captured into a CUDA graph.
    runtime.host_plan = runner.device.type == "cpu" or not uses_cuda_graphs(config)
    model = runner.get_model()
    runtime.register_buffers(model)
    bank_row_of_layer = {options.sets.layers[row]: row for row in options.steered_rows()}
    runtime.handles = install_hooks(model, runtime, options.sets.hook, bank_row_of_layer, config.model_config.dtype)
    if not runtime.handles and config.parallel_config.pipeline_parallel_size == 1:
        raise RuntimeError("emosteer: no layer could be hooked; refusing to run unsteered")
    if runtime.capture is not None:
        local = local_decoder_layers(model)
        runtime.capture.local_rows = [row for layer, row in bank_row_of_layer.items() if layer in local]
    setattr(runner, RUNTIME_ATTR, runtime)
    model.emosteer_runtime = runtime  # reachable from LLM.apply_model, for inspection
    if kernel_runs_on(runner.device):
        path = "Triton kernel" + ("" if runner.device.type == "cuda" else " (Triton's interpreter)")
    else:
        path = "torch: host plan eager, mask and gather compiled"
    runtime.where = f"{runner_name(runner)}, {path}"
    logger.info("emosteer: hooked %d layers at %s on %s (%s)", len(runtime.handles), options.sets.hook,
                runner.device, runtime.where)


def release_finished(runtime, finished_req_ids, preempted_req_ids) -> set[str]:
    """Finished and preempted requests give their slots back; returns both."""
    runtime.forget(finished_req_ids)
    if preempted_req_ids:
        runtime.forget(preempted_req_ids, preempted=True)
    return set(finished_req_ids) | set(preempted_req_ids or ())
