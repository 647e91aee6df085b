"""The vLLM general plugin: `register()` runs in every vLLM process (front-end, engine core, workers, Ray actors).

It installs version-guarded wrappers on vLLM 0.32/0.33 classes. Each wrapper does nothing unless the engine's
`additional_config` has an "emosteer" entry, so installing the package changes nothing by itself.

* EngineArgs.create_engine_config (front-end): checks the options and the vectors file at start-up, so a bad
  file stops the engine with one clear message, and adds a digest of the file (contents, layers, hook, emotions)
  to `additional_config`, which vLLM hashes into its compile-cache key; on CUDA it selects the V1 model runner
  (notice logged).
* InputProcessor.process_inputs (front-end, `LLM` and `vllm serve` alike): validates each request's steering
  before anything is scheduled (SteeringError: ValueError for `LLM`, HTTP 400 for the server) and salts the
  prefix cache of steered requests with the spec's fingerprint and the digests of the vector sets it uses.
* OutputProcessor.add_request (front-end): which unfinished requests use which vector set (updates.py).
* WorkerBase.emosteer_update_set: the worker side of loading and unloading vector sets at run time.
* V1 model runner (workers): load_model installs buffers and hooks; execute_model releases finished and
  preempted requests; _preprocess (real batches only) fills the per-token rows and copies them to the device.
* Worker.compile_or_warm_up_model (workers): one dummy forward where start-up ran none (CPU, eager), so that the
  hooks' shape check refuses a model at start.
  _preprocess runs inside `synchronize_input_prep`, the window in which vLLM may rewrite its reused pinned host
  buffers: with async scheduling, the next step waits there for this step's pending copies.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
import weakref

import numpy as np

logger = logging.getLogger("vllm.emosteer")  # a child of "vllm": vLLM's log handlers and level apply
_installed = False
TAKE_CAPTURES = "emosteer_take_captures"
_front_end = None  # weakref to the last InputProcessor created in this process (the API server has one)


def _wrap(cls, name: str, make):
    original = getattr(cls, name)
    if getattr(original, "_emosteer_wrapped", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._emosteer_wrapped = True
    setattr(cls, name, wrapper)


# ---- front-end ---------------------------------------------------------------------------------------------
def _patch_engine_args():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from .options import CONFIG_KEY, DIGEST_KEY, EmosteerConfigError, is_enabled, options_from_vllm_config

    def make(original):
        def create_engine_config(self, *args, **kwargs):
            extra = self.additional_config if isinstance(self.additional_config, dict) else {}
            if CONFIG_KEY in extra and not current_platform.is_cpu() and "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
                os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
                logger.warning("emosteer: using vLLM's V1 model runner (Model Runner V2 is not supported yet)")
            config = original(self, *args, **kwargs)
            if is_enabled(config):
                try:
                    options = options_from_vllm_config(config)
                    _check_engine_features(config, options)
                except EmosteerConfigError as exc:
                    if "vllm.entrypoints.cli.main" in sys.modules:  # `vllm serve`: one line, not a traceback
                        print(f"ERROR: {exc}", file=sys.stderr)
                        raise SystemExit(1) from None
                    raise
                # vLLM keys its compile cache on additional_config's JSON: with the path alone, a file rewritten
                # in place (other layers, hook or emotions) would reload graphs that steer the wrong layers
                raw = dict(config.additional_config[CONFIG_KEY] or {}, **{DIGEST_KEY: options.config_digest})
                config.additional_config = dict(config.additional_config, **{CONFIG_KEY: raw})
                logger.info("emosteer: steering enabled: %s", options.describe())
                if "vllm.entrypoints.cli.main" in sys.modules and not routes_allowed(os.environ.get("VLLM_PLUGINS")):
                    logger.warning("emosteer: steering is on, but its HTTP routes (/v1/emosteer, vector sets, the "
                                   "playground) are not loaded: vLLM loads endpoint plugins only when VLLM_PLUGINS "
                                   "names them; add emosteer to VLLM_PLUGINS, or start with `vllm-emosteer serve`")
            return config

        return create_engine_config

    _wrap(EngineArgs, "create_engine_config", make)


def routes_allowed(vllm_plugins: str | None) -> bool:
    """Whether vLLM loads the plugin's endpoint plugin under this VLLM_PLUGINS value."""
    return vllm_plugins is not None and "emosteer" in [name.strip() for name in vllm_plugins.split(",")]


def _check_engine_features(config, options) -> None:
    from .options import EmosteerConfigError

    parallel = config.parallel_config
    problems = []
    if getattr(parallel, "enable_dbo", False):
        problems.append("dual-batch overlap (--enable-dbo) splits the batch into micro-batches")
    if getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        problems.append("prefill context parallelism splits tokens across ranks")
    if config.speculative_config is not None:
        problems.append("speculative decoding is not supported yet")
    if options.mode == "naive" and (config.compilation_config.mode != 0 or _uses_cuda_graphs(config)):
        problems.append("mode 'naive' (a Python loop per request) needs enforce_eager=True (no compilation, "
                        "no CUDA graphs: a graph would freeze one step's loop)")
    if options.capture is not None:
        if config.compilation_config.mode != 0 or _uses_cuda_graphs(config):
            problems.append("capture mode needs enforce_eager=True (it selects tokens on the host every step)")
        if config.cache_config.enable_prefix_caching:
            problems.append("capture mode needs enable_prefix_caching=False (a cached token is never computed, "
                            "so it could not be captured)")
    if problems:
        raise EmosteerConfigError("emosteer cannot steer this engine: " + "; ".join(problems))


def _uses_cuda_graphs(config) -> bool:
    mode = getattr(config.compilation_config, "cudagraph_mode", None)
    return mode is not None and getattr(mode, "name", str(mode)) != "NONE"


def _validate(processor, params):
    """The request's steering spec under this front-end's engine (None: unsteered), or a SteeringError."""
    from .options import frontend_options, is_enabled
    from .prefix_cache import CACHE_KEY
    from .spec import SteeringError, has_steering_args, parse_steering

    if isinstance(params.extra_args, dict) and CACHE_KEY in params.extra_args:
        raise SteeringError(f"{CACHE_KEY!r} is reserved for the emosteer plugin", CACHE_KEY)
    if is_enabled(processor.vllm_config):
        _validate_capture(frontend_options(processor), params.extra_args)
        return parse_steering(params.extra_args, frontend_options(processor).limits)
    if has_steering_args(params.extra_args):
        raise SteeringError("this engine was started without steering; start it with "
                            "additional_config {\"emosteer\": {}} to use emotions", "emosteer")
    return None


def _validate_capture(options, extra_args) -> None:
    from .capture import CAPTURE_KEY, CaptureError, parse_capture
    from .spec import SteeringError

    if not isinstance(extra_args, dict) or CAPTURE_KEY not in extra_args:
        return
    if options.capture is None:
        raise SteeringError("this engine was not started in capture mode (option capture)", CAPTURE_KEY)
    try:
        parse_capture(extra_args)
    except CaptureError as exc:
        raise SteeringError(str(exc), CAPTURE_KEY) from None


def _patch_input_processor():
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import OutputProcessor

    from . import metrics
    from .options import frontend_options, is_enabled
    from .prefix_cache import CACHE_KEY, cache_entry
    from .spec import SteeringError
    from .updates import usage

    def make_init(original):
        def __init__(self, *args, **kwargs):
            global _front_end
            original(self, *args, **kwargs)
            _front_end = weakref.ref(self)

        return __init__

    def make(original):
        def process_inputs(self, request_id, prompt, params, *args, **kwargs):
            spec = token = salt = None
            if isinstance(params, SamplingParams):
                with usage.lock:  # atomic with a runtime unload's check (updates.py)
                    spec = _validate(self, params)
                    if spec is not None and kwargs.get("resumable"):
                        raise SteeringError("steering is not supported on streaming-input sessions (a request "
                                            "that receives more input chunks)", "emosteer")
                    if spec is not None:
                        sets = frontend_options(self).sets
                        token = usage.hold(spec.set_names(sets.default.name))
                        salt = sets.salt(spec)
            try:
                request = original(self, request_id, prompt, params, *args, **kwargs)
            except BaseException:
                if token is not None:
                    usage.release(token)
                raise
            if spec is not None:
                usage.attach(token, request)
                params = request.sampling_params  # vLLM's copy: the caller's params may serve other prompts
                params.extra_args = {**params.extra_args, CACHE_KEY: cache_entry(salt, spec)}
            if isinstance(params, SamplingParams) and is_enabled(self.vllm_config):
                metrics.count_request(spec)
            return request

        return process_inputs

    def make_add(original):
        def add_request(self, request, *args, **kwargs):
            result = original(self, request, *args, **kwargs)
            usage.registered(request)
            return result

        return add_request

    def make_finish(original):
        def _finish_request(self, req_state, *args, **kwargs):
            result = original(self, req_state, *args, **kwargs)
            usage.finished([req_state.request_id])
            return result

        return _finish_request

    def make_abort(original):
        def abort_requests(self, *args, **kwargs):
            aborted = original(self, *args, **kwargs)
            usage.finished(aborted or ())
            return aborted

        return abort_requests

    _wrap(InputProcessor, "__init__", make_init)
    _wrap(InputProcessor, "process_inputs", make)
    _wrap(OutputProcessor, "add_request", make_add)
    _wrap(OutputProcessor, "_finish_request", make_finish)
    _wrap(OutputProcessor, "abort_requests", make_abort)


def _patch_openai_requests():
    """`vllm serve`: validate steering where vLLM turns a request into sampling parameters, before any response
    starts, so a streaming request with bad steering gets HTTP 400 like a non-streaming one (not 200 and an
    error event inside the stream). The engine's own check in process_inputs stays."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.sampling_params import SamplingParams

    from .spec import SteeringError, has_steering_args

    def make(original):
        def to_sampling_params(self, *args, **kwargs):
            params = original(self, *args, **kwargs)
            processor = _front_end() if _front_end is not None else None
            if processor is not None and isinstance(params, SamplingParams):
                _validate(processor, params)
            return params

        return to_sampling_params

    def make_beam(original):
        def to_beam_search_params(self, *args, **kwargs):
            if has_steering_args(getattr(self, "vllm_xargs", None)):  # beam search sends no extra_args
                raise SteeringError("steering does not work with beam search; drop use_beam_search or the "
                                    "steering fields", "use_beam_search", True)
            return original(self, *args, **kwargs)

        return to_beam_search_params

    for cls in (ChatCompletionRequest, CompletionRequest):
        _wrap(cls, "to_sampling_params", make)
        _wrap(cls, "to_beam_search_params", make_beam)


def _patch_prefix_cache_keys():
    """Engine core: the steering key in the block hashes of steered requests (prefix_cache.py). Wrapped in every
    module that took the function by name, so that hashes and KV events agree."""
    from .prefix_cache import with_steering_keys

    for name in ("vllm.v1.core.kv_cache_utils", "vllm.v1.core.block_pool", "vllm.v1.simple_kv_offload.manager"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            if name == "vllm.v1.core.kv_cache_utils":
                raise
            continue
        function = getattr(module, "generate_block_hash_extra_keys", None)
        if function is not None and not getattr(function, "_emosteer_wrapped", False):
            module.generate_block_hash_extra_keys = with_steering_keys(function)


# ---- workers -----------------------------------------------------------------------------------------------
def install_steering(runner) -> None:
    """Build the steering state of a V1 model runner whose model has just loaded, and hook the model."""
    from .hooks import install_hooks
    from .options import options_from_vllm_config
    from .runtime import SteeringRuntime

    options = options_from_vllm_config(runner.vllm_config)
    runtime = SteeringRuntime(options, runner.max_num_tokens, runner.max_num_reqs, runner.device)
    # Hooks that run eagerly may decide on the host once per step (skip a step without steered tokens, no
    # per-layer nonzero on CPU); never where the forward is captured into a CUDA graph.
    runtime.host_plan = runner.device.type == "cpu" or not _uses_cuda_graphs(runner.vllm_config)
    runtime.register_buffers(runner.get_model())
    rows = {options.sets.layers[row]: row for row in options.steered_rows()}
    runtime.handles = install_hooks(runner.get_model(), runtime, options.sets.hook, rows,
                                    runner.vllm_config.model_config.dtype)
    if not runtime.handles and runner.vllm_config.parallel_config.pipeline_parallel_size == 1:
        raise RuntimeError("emosteer: no layer could be hooked; refusing to run unsteered")
    if runtime.capture is not None:
        from .hooks import local_decoder_layers

        local = local_decoder_layers(runner.get_model())
        runtime.capture.local_rows = [row for layer, row in rows.items() if layer in local]
    runner._emosteer = runtime
    runner.get_model().emosteer_runtime = runtime  # reachable from LLM.apply_model, for inspection
    logger.info(
        "emosteer: hooked %d layers at %s on %s (%s)", len(runtime.handles), options.sets.hook,
        runner.device, "Triton kernel" if runner.device.type == "cuda" else "torch op",
    )


def _prepare_step(runner) -> None:
    runtime = runner._emosteer
    batch = runner.input_batch
    n = batch.num_reqs
    counts = np.diff(runner.query_start_loc.np[: n + 1])
    runtime.prepare(
        batch.req_ids[:n], runner.requests, counts, batch.num_computed_tokens_cpu[:n], runner.query_pos.np
    )


def _patch_v1_runner():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .options import is_enabled

    def make_load(original):
        def load_model(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if is_enabled(self.vllm_config):
                install_steering(self)
            return result

        return load_model

    def make_execute(original):
        def execute_model(self, scheduler_output, *args, **kwargs):
            runtime = getattr(self, "_emosteer", None)
            if runtime is not None:
                runtime.forget(scheduler_output.finished_req_ids)
                if scheduler_output.preempted_req_ids:
                    runtime.forget(scheduler_output.preempted_req_ids, preempted=True)
            return original(self, scheduler_output, *args, **kwargs)

        return execute_model

    def make_prepare(original):
        def wrapper(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            if getattr(self, "_emosteer", None) is not None:
                _prepare_step(self)
            return result

        return wrapper

    _wrap_where_defined(GPUModelRunner, "vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "load_model", make_load)
    _wrap(GPUModelRunner, "execute_model", make_execute)
    # _preprocess runs last inside synchronize_input_prep (vLLM 0.32/0.33); _model_forward runs after it
    _wrap(GPUModelRunner, "_preprocess" if hasattr(GPUModelRunner, "_preprocess") else "_model_forward",
          make_prepare)


def _wrap_where_defined(cuda_cls, cpu_module: str, cpu_name: str, name: str, make) -> None:
    """Wrap `name` on the CUDA class and, on the CPU platform, on its CPU subclass where that overrides it."""
    from vllm.platforms import current_platform

    classes = [cuda_cls]
    if current_platform.is_cpu():
        classes.append(getattr(importlib.import_module(cpu_module), cpu_name))
    for cls in classes:
        if name in cls.__dict__:
            _wrap(cls, name, make)


def _patch_warm_up():
    """After start-up's warm-up: where vLLM ran no forward (CPU, eager), run one dummy forward, so that hooked
    tensors that are not [T, H] refuse the model now rather than at its first request."""
    from vllm.v1.worker.gpu_worker import Worker

    def make(original):
        def compile_or_warm_up_model(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            runtime = getattr(self.model_runner, "_emosteer", None)
            if runtime is not None and runtime.handles and not runtime.hooks_ran:
                self.model_runner._dummy_run(2)  # 2 tokens: a [T, 1, H] output must not pass as [1, T, H]
            return result

        return compile_or_warm_up_model

    _wrap_where_defined(Worker, "vllm.v1.worker.cpu_worker", "CPUWorker", "compile_or_warm_up_model", make)


def take_captures_on_worker(worker) -> dict:
    """The worker side of TAKE_CAPTURES: this rank's finished captures, as bytes (vLLM's RPC encoder does not
    round-trip nested tensors); tensor-parallel ranks other than 0 hold the same values and send nothing."""
    from vllm.distributed import get_tensor_model_parallel_rank

    runtime = getattr(getattr(worker, "model_runner", None), "_emosteer", None)
    if runtime is None or runtime.capture is None:
        raise RuntimeError("emosteer: this worker is not in capture mode")
    done = runtime.capture.take()
    if get_tensor_model_parallel_rank() != 0:
        return {}
    rows = runtime.capture.local_rows
    return {key: {"rows": rows, "count": item["count"], "sums": item["sums"].numpy().tobytes(),
                  "norms": [item["norms"][row].numpy().tobytes() for row in rows]} for key, item in done.items()}


def _patch_worker():
    from vllm.v1.worker.worker_base import WorkerBase

    from .updates import RPC_METHOD, update_set_on_worker

    if not hasattr(WorkerBase, RPC_METHOD):
        setattr(WorkerBase, RPC_METHOD, update_set_on_worker)
    if not hasattr(WorkerBase, TAKE_CAPTURES):
        setattr(WorkerBase, TAKE_CAPTURES, take_captures_on_worker)


def _patch_v2_runner():
    """Model Runner V2 is not supported yet: refuse to start rather than run unsteered."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    except Exception:  # not present in this build
        return
    from .options import is_enabled

    def make(original):
        def load_model(self, *args, **kwargs):
            if is_enabled(self.vllm_config):
                raise RuntimeError(
                    "emosteer: vLLM chose Model Runner V2, which emosteer does not support yet; "
                    "set VLLM_USE_V2_MODEL_RUNNER=0"
                )
            return original(self, *args, **kwargs)

        return load_model

    _wrap(V2Runner, "load_model", make)


def install() -> None:
    global _installed
    if _installed:
        return
    from . import ops  # noqa: F401  registers torch.ops.emosteer.steer_add_

    _patch_engine_args()
    _patch_input_processor()
    _patch_openai_requests()
    _patch_prefix_cache_keys()
    _patch_v1_runner()
    _patch_warm_up()
    _patch_worker()
    _patch_v2_runner()
    _installed = True
