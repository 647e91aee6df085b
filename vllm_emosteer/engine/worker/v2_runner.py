"""The seam on vLLM's Model Runner V2 (`vllm.v1.worker.gpu.model_runner`: CUDA's default since vLLM 0.32, the only
runner from 0.34 on, GPU and CPU). It follows MRv2's own per-request state (its LoRA state is the model):

* load_model: build the steering runtime and hook the model.
* add_requests: note each new request's sampling parameters and prompt length (MRv2 keeps no request objects).
* finish_requests: finished and preempted requests give their slots back (MRv2 frees both there too).
* prepare_inputs (real batches only; dummy runs never call it): this step's per-token rows from the InputBatch it
  returns (`req_ids` in batch-row order, `query_start_loc_np`, `num_computed_tokens_np`), before the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..options import is_enabled
from ..vllm_internals import runtime_of, wrap
from .steering import install_steering, release_finished

NEW_REQUESTS = "_emosteer_new_requests"  # the runner's attribute: req_id -> NewRequest, until the request ends


@dataclass(frozen=True)
class NewRequest:
    sampling_params: object
    num_prompt_tokens: int


def prepare_step(runner, runtime, batch) -> None:
    n = batch.num_reqs
    counts = np.diff(batch.query_start_loc_np[: n + 1])
    runtime.prepare(batch.req_ids[:n], getattr(runner, NEW_REQUESTS), counts, batch.num_computed_tokens_np[:n])


def install() -> list[str]:
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    except ImportError:  # a vLLM without Model Runner V2
        return []

    def make_load(original):
        def load_model(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if is_enabled(self.vllm_config):
                setattr(self, NEW_REQUESTS, {})
                install_steering(self)
            return result

        return load_model

    def make_add(original):
        def add_requests(self, scheduler_output, *args, **kwargs):
            if runtime_of(self) is not None:
                new = getattr(self, NEW_REQUESTS)
                for data in scheduler_output.scheduled_new_reqs:
                    new[data.req_id] = NewRequest(data.sampling_params, data.prompt_len)
            return original(self, scheduler_output, *args, **kwargs)

        return add_requests

    def make_finish(original):
        def finish_requests(self, scheduler_output, *args, **kwargs):
            runtime = runtime_of(self)
            if runtime is not None:
                ended = release_finished(runtime, scheduler_output.finished_req_ids,
                                         scheduler_output.preempted_req_ids)
                new = getattr(self, NEW_REQUESTS)
                for req_id in ended:
                    new.pop(req_id, None)
            return original(self, scheduler_output, *args, **kwargs)

        return finish_requests

    def make_prepare(original):
        def prepare_inputs(self, *args, **kwargs):
            batch = original(self, *args, **kwargs)
            runtime = runtime_of(self)
            if runtime is not None:
                prepare_step(self, runtime, batch)
            return batch

        return prepare_inputs

    return [wrap(GPUModelRunner, "load_model", make_load), wrap(GPUModelRunner, "add_requests", make_add),
            wrap(GPUModelRunner, "finish_requests", make_finish),
            wrap(GPUModelRunner, "prepare_inputs", make_prepare)]
