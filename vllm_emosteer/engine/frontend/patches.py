"""The front-end's wrappers on vLLM: each a short wrapper around vLLM's method that calls a named function.

* EngineArgs.create_engine_config: checks the options, the vectors files and the engine's features at start, so a
  bad file stops the engine with one clear message, and adds a digest of the vector sets to additional_config,
  which vLLM hashes into its compile-cache key.
* InputProcessor.process_inputs (`LLM` and `vllm serve` alike): validates each request's steering before anything
  is scheduled, holds its vector sets (usage.py) and gives it its prefix-cache key (prefix_cache.py).
* OutputProcessor.add_request / _finish_request / abort_requests: a request's sets are held until it ends.
* ChatCompletionRequest / CompletionRequest: steering is validated where vLLM turns a request into sampling
  parameters, so a streaming request gets HTTP 400 before any event; beam search with steering fields is refused.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref

from .. import metrics
from ..options import CONFIG_KEY, DIGEST_KEY, EmosteerConfigError, frontend_options, is_enabled, options_from_vllm_config
from ..prefix_cache import CACHE_KEY, cache_entry
from ..vllm_internals import under_vllm_cli, version_status, wrap
from .usage import usage
from .validation import check_engine_features, refuse_on_streaming_input, refuse_with_beam_search, routes_allowed, \
    validate

logger = logging.getLogger("vllm.emosteer")
_front_end = None  # weakref to the last InputProcessor created in this process (the API server has one)


def checked_engine_config(config):
    """The engine config with the steering options checked and their digest added (start-up)."""
    if not is_enabled(config):
        return config
    try:
        options = options_from_vllm_config(config)
        check_engine_features(config, options)
    except EmosteerConfigError as exc:
        if under_vllm_cli():  # `vllm serve`: one line, not a traceback
            print(f"ERROR: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        raise
    # vLLM keys its compile cache on additional_config's JSON: with the path alone, a file rewritten in place
    # (other layers, hook or emotions) would reload graphs that steer the wrong layers
    raw = dict(config.additional_config[CONFIG_KEY] or {}, **{DIGEST_KEY: options.config_digest})
    config.additional_config = dict(config.additional_config, **{CONFIG_KEY: raw})
    logger.info("emosteer: steering enabled: %s; %s", options.describe(), version_status()[1])
    if config.speculative_config is not None:
        logger.info("emosteer: speculative decoding (%s): every token the target verifies is steered as it would be "
                    "without speculation; the drafter is not steered (only the acceptance rate can change)",
                    config.speculative_config.method)
    if under_vllm_cli() and not routes_allowed(os.environ.get("VLLM_PLUGINS")):
        logger.warning("emosteer: steering is on, but its HTTP routes (/v1/emosteer, vector sets, the playground) "
                       "are not loaded: vLLM loads endpoint plugins only when VLLM_PLUGINS names them; add emosteer "
                       "to VLLM_PLUGINS, or start with `vllm-emosteer serve`")
    return config


def process_inputs(processor, original, request_id, prompt, params, args, kwargs):
    """vLLM's process_inputs, with the request's steering validated, its sets held and its cache key given."""
    from vllm.sampling_params import SamplingParams

    if not isinstance(params, SamplingParams):
        return original(processor, request_id, prompt, params, *args, **kwargs)
    token = entry = None
    with usage.lock:  # atomic with a runtime unload's check (set_changes.py)
        spec = validate(processor, params)
        refuse_on_streaming_input(spec, kwargs.get("resumable", False))
        if spec is not None:
            sets = frontend_options(processor).sets
            token = usage.hold(spec.set_names(sets.default.name))
            entry = cache_entry(sets, spec)
    try:
        request = original(processor, request_id, prompt, params, *args, **kwargs)
    except BaseException:
        if token is not None:
            usage.release(token)
        raise
    if spec is not None:
        usage.attach(token, request)
        copy = request.sampling_params  # vLLM's copy: the caller's params may serve other prompts
        copy.extra_args = {**copy.extra_args, CACHE_KEY: entry}
    if is_enabled(processor.vllm_config):
        metrics.count_request(spec)
    return request


def patch_engine_args() -> list[str]:
    from vllm.engine.arg_utils import EngineArgs
    def make(original):
        def create_engine_config(self, *args, **kwargs):
            return checked_engine_config(original(self, *args, **kwargs))

        return create_engine_config

    return [wrap(EngineArgs, "create_engine_config", make)]


def patch_input_and_output_processors() -> list[str]:
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import OutputProcessor

    def make_init(original):
        def __init__(self, *args, **kwargs):
            global _front_end
            original(self, *args, **kwargs)
            _front_end = weakref.ref(self)

        return __init__

    def make_process(original):
        def wrapper(self, request_id, prompt, params, *args, **kwargs):
            return process_inputs(self, original, request_id, prompt, params, args, kwargs)

        return wrapper

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

    return [wrap(InputProcessor, "__init__", make_init), wrap(InputProcessor, "process_inputs", make_process),
            wrap(OutputProcessor, "add_request", make_add), wrap(OutputProcessor, "_finish_request", make_finish),
            wrap(OutputProcessor, "abort_requests", make_abort)]


def patch_openai_requests() -> list[str]:
    """`vllm serve`: validate steering where vLLM turns a request into sampling parameters, before any response
    starts, so a streaming request with bad steering gets HTTP 400 like a non-streaming one (not 200 and an error
    event inside the stream). The engine's own check in process_inputs stays."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.sampling_params import SamplingParams

    def make(original):
        def to_sampling_params(self, *args, **kwargs):
            params = original(self, *args, **kwargs)
            processor = _front_end() if _front_end is not None else None
            if processor is not None and isinstance(params, SamplingParams):
                validate(processor, params)
            return params

        return to_sampling_params

    def make_beam(original):
        def to_beam_search_params(self, *args, **kwargs):
            refuse_with_beam_search(getattr(self, "vllm_xargs", None))
            return original(self, *args, **kwargs)

        return to_beam_search_params

    return [name for cls in (ChatCompletionRequest, CompletionRequest)
            for name in (wrap(cls, "to_sampling_params", make), wrap(cls, "to_beam_search_params", make_beam))]


def install() -> list[str]:
    return patch_engine_args() + patch_input_and_output_processors() + patch_openai_requests()
