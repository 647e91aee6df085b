"""The seam on vLLM's V1 model runner (`vllm.v1.worker.gpu_model_runner`, vLLM up to 0.33; gone in 0.34).

* load_model (and the CPU runner's override): build the steering runtime and hook the model.
* execute_model: finished and preempted requests give their slots back.
* _preprocess (real batches only): this step's per-token rows from the runner's persistent input batch (requests
  in batch-row order, `query_start_loc`, `num_computed_tokens_cpu`). It runs last inside `synchronize_input_prep`.
"""

from __future__ import annotations

import numpy as np

from ..options import is_enabled
from ..vllm_internals import runtime_of, wrap, wrap_where_defined
from .steering import install_steering, release_finished


def prepare_step(runner, runtime) -> None:
    batch = runner.input_batch
    n = batch.num_reqs
    counts = np.diff(runner.query_start_loc.np[: n + 1])
    runtime.prepare(batch.req_ids[:n], runner.requests, counts, batch.num_computed_tokens_cpu[:n])


def install() -> list[str]:
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:  # vLLM 0.34 on: Model Runner V2 only
        return []

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
                release_finished(runtime, scheduler_output.finished_req_ids, scheduler_output.preempted_req_ids)
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
