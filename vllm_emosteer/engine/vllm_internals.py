"""Every vLLM internal the plugin touches, named in one place: a vLLM upgrade is this file to read.

Wrapped (each wrapper does nothing unless the engine's additional_config has "emosteer"):
* front-end (frontend/patches.py): EngineArgs.create_engine_config; InputProcessor.__init__ and .process_inputs
  (reads params.extra_args, writes request.sampling_params.extra_args, kwarg `resumable`);
  OutputProcessor.add_request, ._finish_request (req_state.request_id), .abort_requests (returns the aborted ids),
  .request_states; ChatCompletionRequest / CompletionRequest .to_sampling_params, .to_beam_search_params
  (.vllm_xargs); vllm_config.parallel_config._api_process_count.
* engine core (prefix_cache.py): generate_block_hash_extra_keys(request, start, end, mm_index) in
  vllm.v1.core.kv_cache_utils and in the modules that import it by name (BLOCK_KEY_MODULES); request.sampling_params,
  request.num_prompt_tokens.
* workers (worker/patches.py): the V1 GPUModelRunner's load_model (and CPUModelRunner's override),
  execute_model (scheduler_output.finished_req_ids / .preempted_req_ids), _preprocess (runs last inside
  synchronize_input_prep; reads input_batch.req_ids / .num_reqs / .num_computed_tokens_cpu, query_start_loc.np,
  query_pos.np, requests, max_num_tokens, max_num_reqs, device, get_model(), _dummy_run); Worker's (and CPUWorker's)
  compile_or_warm_up_model; Model Runner V2's load_model (refused); methods added to WorkerBase for collective RPCs
  (UPDATE_SET_RPC, TAKE_CAPTURES_RPC); vllm.v1.utils.CpuGpuBuffer; RowParallelLinear's tp_rank, tp_size and
  reduce_results; decoder layers at model.model.layers with start_layer / end_layer.
"""

from __future__ import annotations

import functools
import importlib
import sys

TESTED_VERSIONS = ("0.32", "0.33")
UPDATE_SET_RPC = "emosteer_update_set"  # WorkerBase method: load or unload a vector set (worker/rpc.py)
TAKE_CAPTURES_RPC = "emosteer_take_captures"  # WorkerBase method: finished captures (worker/rpc.py)
BLOCK_KEY_MODULES = ("vllm.v1.core.kv_cache_utils", "vllm.v1.core.block_pool", "vllm.v1.simple_kv_offload.manager")
RUNTIME_ATTR = "_emosteer"  # the model runner's steering runtime
WRAPPED = "_emosteer_wrapped"


def wrap(cls, name: str, make) -> str:
    """Replace cls.name by make(original), once; returns "Class.name" for the install log."""
    original = getattr(cls, name)
    if not getattr(original, WRAPPED, False):
        wrapper = functools.wraps(original)(make(original))
        setattr(wrapper, WRAPPED, True)
        setattr(cls, name, wrapper)
    return f"{cls.__name__}.{name}"


def wrap_where_defined(cuda_cls, cpu_module: str, cpu_name: str, name: str, make) -> list[str]:
    """Wrap `name` on the CUDA class and, on the CPU platform, on its CPU subclass where that overrides it."""
    from vllm.platforms import current_platform

    classes = [cuda_cls]
    if current_platform.is_cpu():
        classes.append(getattr(importlib.import_module(cpu_module), cpu_name))
    return [wrap(cls, name, make) for cls in classes if name in cls.__dict__]


def uses_cuda_graphs(vllm_config) -> bool:
    mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    return mode is not None and getattr(mode, "name", str(mode)) != "NONE"


def api_server_count(vllm_config) -> int:
    """How many API server processes share the engine (`--api-server-count`); each has its own front-end."""
    return getattr(vllm_config.parallel_config, "_api_process_count", 1)


def runtime_of(worker_or_runner):
    """The steering runtime of a worker or a model runner, or None."""
    runner = getattr(worker_or_runner, "model_runner", worker_or_runner)
    return getattr(runner, RUNTIME_ATTR, None)


def under_vllm_cli() -> bool:
    """Whether this process is `vllm serve` (start-up errors are then one line, not a traceback)."""
    return "vllm.entrypoints.cli.main" in sys.modules


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")
