"""What the front-end decides: whether an engine can be steered (at start) and each request's steering (before
anything is scheduled). SteeringError is a ValueError for `LLM` and an HTTP 400 for the server."""

from __future__ import annotations

from vllm import envs

from ..options import EmosteerConfigError, EmosteerOptions, frontend_options, is_enabled
from ..prefix_cache import CACHE_KEY
from ..spec import SteeringError, SteeringSpec, has_steering_args, parse_steering
from ..vllm_internals import uses_cuda_graphs
from ..capture_request import CAPTURE_KEY, CaptureError, parse_capture

PLUGIN_NAME = "emosteer"  # the entry points' name, as VLLM_PLUGINS lists it
# KV connectors that store and find KV by vLLM's block hashes, which carry the steering key (prefix_cache.py);
# the others (e.g. the example connector, keyed by token ids) could hand steered KV to unsteered requests
BLOCK_HASH_CONNECTORS = ("OffloadingConnector", "SimpleCPUOffloadConnector")


def check_engine_features(config, options: EmosteerOptions) -> None:
    """Refuse, with one message, an engine whose features would steer the wrong tokens or none."""
    parallel = config.parallel_config
    problems = []
    if getattr(parallel, "enable_dbo", False):
        problems.append("dual-batch overlap (--enable-dbo) splits the batch into micro-batches")
    if getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        problems.append("prefill context parallelism splits tokens across ranks")
    problems += speculative_problems(config.speculative_config, options)
    if getattr(envs, "VLLM_USE_RUST_FRONTEND", False):  # read as vLLM reads it
        problems.append("the Rust front-end (VLLM_USE_RUST_FRONTEND) does not run the plugin's request checks, so the "
                        "engine core would refuse every steered request")
    if getattr(getattr(config, "cache_config", None), "kv_sharing_fast_prefill", False):
        problems.append("kv_sharing_fast_prefill runs the cross-decoder layers on one token per request, so offsets "
                        "would land on other tokens")
    connector = getattr(getattr(config, "kv_transfer_config", None), "kv_connector", None)
    if connector and connector not in BLOCK_HASH_CONNECTORS:
        problems.append(f"the KV connector {connector} does not key KV by vLLM's block hashes (which carry the "
                        f"steering key), so it could hand steered KV to unsteered requests; these do: "
                        f"{', '.join(BLOCK_HASH_CONNECTORS)}")
    if options.mode == "naive" and (config.compilation_config.mode != 0 or uses_cuda_graphs(config)):
        problems.append("mode 'naive' (a Python loop per request) needs enforce_eager=True (no compilation, "
                        "no CUDA graphs: a graph would freeze one step's loop)")
    if options.capture is not None:
        if config.compilation_config.mode != 0 or uses_cuda_graphs(config):
            problems.append("capture mode needs enforce_eager=True (it selects tokens on the host every step)")
        if config.cache_config.enable_prefix_caching:
            problems.append("capture mode needs enable_prefix_caching=False (a cached token is never computed, "
                            "so it could not be captured)")
    if problems:
        raise EmosteerConfigError("emosteer cannot steer this engine: " + "; ".join(problems))


def speculative_problems(speculative, options: EmosteerOptions) -> list[str]:
    """Speculative decoding is steered exactly: the target verifies every draft token at its own position, each
    steered as that position is without speculation (positions decide only where steering starts, inside the prompt,
    and drafts come after it), and a rejected draft leaves no per-request state behind. The drafter is not steered:
    it proposes, the steered target decides, so only the acceptance rate can change. Refused where that fails."""
    if speculative is None:
        return []
    problems = []
    if getattr(speculative, "enable_adaptive_verification", False):
        problems.append("speculative decoding with adaptive verification sizes each request's drafts on the GPU, "
                        "so the host cannot tell which tokens belong to which request")
    if options.capture is not None:
        problems.append("capture mode cannot run with speculative decoding (rejected drafts would be captured)")
    return problems


def listed_plugins(vllm_plugins: str) -> list[str]:
    """The plugin names a VLLM_PLUGINS value lists (comma-separated, as vLLM reads it)."""
    return [name.strip() for name in vllm_plugins.split(",") if name.strip()]


def routes_allowed(vllm_plugins: str | None) -> bool:
    """Whether vLLM loads the plugin's endpoint plugin under this VLLM_PLUGINS value."""
    return vllm_plugins is not None and PLUGIN_NAME in listed_plugins(vllm_plugins)


def validate(processor, params) -> SteeringSpec | None:
    """The request's steering spec under this front-end's engine (None: unsteered), or a SteeringError."""
    if isinstance(params.extra_args, dict) and CACHE_KEY in params.extra_args:
        raise SteeringError(f"{CACHE_KEY!r} is reserved for the emosteer plugin", CACHE_KEY)
    if is_enabled(processor.vllm_config):
        options = frontend_options(processor)
        _validate_capture(options, params.extra_args)
        return parse_steering(params.extra_args, options.limits)
    if has_steering_args(params.extra_args):
        raise SteeringError("this engine was started without steering; start it with "
                            "additional_config {\"emosteer\": {}} to use emotions", "emosteer")
    return None


def refuse_with_beam_search(vllm_xargs) -> None:
    """vLLM builds beam-search requests without extra_args: steering fields there would be dropped."""
    if has_steering_args(vllm_xargs):
        raise SteeringError("steering does not work with beam search; drop use_beam_search or the steering fields",
                            "use_beam_search", True)


def refuse_on_streaming_input(spec: SteeringSpec | None, resumable: bool) -> None:
    """A streaming-input session's later chunks would keep the first chunk's coefficients and start position."""
    if spec is not None and resumable:
        raise SteeringError("steering is not supported on streaming-input sessions (a request that receives more "
                            "input chunks)", "emosteer")


def _validate_capture(options: EmosteerOptions, extra_args) -> None:
    if not isinstance(extra_args, dict) or CAPTURE_KEY not in extra_args:
        return
    if options.capture is None:
        raise SteeringError("this engine was not started in capture mode (option capture)", CAPTURE_KEY)
    try:
        parse_capture(extra_args)
    except CaptureError as exc:
        raise SteeringError(str(exc), CAPTURE_KEY) from None
