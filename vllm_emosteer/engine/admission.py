"""The engine core decides which requests are steered, and how: one decider for the blocks it keys and the tokens the
workers steer.

The front-end validates a request's steering and stamps its prefix-cache key (CACHE_KEY, prefix_cache.py). vLLM
also takes requests that never pass that front-end: a pre-built EngineCoreRequest given to `LLMEngine.add_request`
or `AsyncLLM.add_request`, or another front-end. Every request passes the engine core, so there, before it is
scheduled, the stamp is derived again from the request's steering fields and the engine core's own copy of the
vector sets, and the request is refused (a request-scoped error; the engine keeps serving) when the stamp is
missing, forged or made under other sets. The workers steer those same fields under the same sets and check the
stamp once more (runtime.py), so what is steered is what is keyed.

The engine core's copy of the sets follows every runtime change, read from the set-update RPC as it passes through
(it is the one process every change goes through), and a change is refused while a request admitted here and not
yet finished uses the set (requests that skipped the front-end hold no set there): whichever of the two takes the
lock first, a request is never steered with a set other than the one it was admitted with.
"""

from __future__ import annotations

import threading

from .options import is_enabled, options_from_vllm_config
from .prefix_cache import CACHE_KEY, cache_entry
from .sets import bank_of_update
from .spec import SteeringError, has_steering_args, parse_steering, referenced_sets
from .vllm_internals import UPDATE_SET_RPC, wrap

OPTIONS_ATTR = "_emosteer_options"  # the engine core's options: its copy of the vector sets
PENDING_ATTR = "_emosteer_admitted"  # req_id -> its extra_args, from admission until the scheduler holds the request
_lock = threading.Lock()  # admission runs on vLLM's input thread, set changes on its busy loop


def expected_stamp(options, extra_args) -> list | None:
    """The stamp the front-end gives a request with these extra_args (None: unsteered), or a SteeringError."""
    spec = parse_steering(extra_args, options.limits)
    return None if spec is None else cache_entry(options.sets, spec)


def options_of(core):
    """The engine core's options (None: steering is off), built on first use: vLLM may load the plugin inside the
    engine core's own __init__, too late to wrap it."""
    options = getattr(core, OPTIONS_ATTR, None)
    if options is None and is_enabled(core.vllm_config):
        options = options_from_vllm_config(core.vllm_config)
        setattr(core, OPTIONS_ATTR, options)
    return options


def check_request(core, request) -> None:
    """Refuse a request whose steering stamp is not the one its steering fields and the current sets give (the
    caller holds the lock)."""
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
    if not isinstance(extra, dict) or (CACHE_KEY not in extra and not has_steering_args(extra)):
        return
    options = options_of(core)
    if options is None:
        raise SteeringError("this engine was started without steering; its requests cannot carry steering fields",
                            "emosteer")
    stamp = extra.get(CACHE_KEY)
    expected = expected_stamp(options, extra)  # the parse ignores CACHE_KEY itself
    if stamp is None and expected is None:  # steering fields that steer nothing (every intensity 0)
        return
    if stamp is None:
        raise SteeringError("a steered request must pass vLLM's input processing (LLM, LLMEngine or AsyncLLM with "
                            "a prompt, or vllm serve), where the plugin validates it and keys its prefix cache; "
                            "this one skipped it (a pre-built EngineCoreRequest, or another front-end)", CACHE_KEY)
    if not isinstance(stamp, (list, tuple)) or list(stamp) != expected:
        raise SteeringError(f"{CACHE_KEY!r} does not match the request's steering under the engine's vector sets "
                            "(set by hand, or made before a set changed)", CACHE_KEY)


def users_of(core, name: str) -> list[str]:
    """Requests admitted and not yet finished whose steering names the set: in the scheduler, or admitted on the
    input thread and not yet handed to it."""
    default = options_of(core).sets.default.name
    extras = {req_id: getattr(r.sampling_params, "extra_args", None)
              for req_id, r in getattr(core.scheduler, "requests", {}).items()}
    extras.update(getattr(core, PENDING_ATTR, {}))
    return [req_id for req_id, extra in extras.items() if name in {s or default for s in referenced_sets(extra)}]


def follow_set_update(core, original, args):
    """Run the set-update RPC on the workers, refused while an admitted, unfinished request uses the set; then update
    the engine core's copy the same way."""
    name, vectors, metadata, source = args
    with _lock:
        users = users_of(core, name)
        if users:
            raise RuntimeError(f"emosteer: set {name!r} is used by {len(users)} unfinished request(s) in the engine "
                               "core; retry when they finish")
        results = original()
        sets = options_of(core).sets
        bank = bank_of_update(vectors, metadata, source)
        if bank is None:
            if name in sets.by_name:
                sets.remove(name)
        else:
            sets.add(name, bank, source)
    return results


def install() -> list[str]:
    from vllm.v1.engine.core import EngineCore

    def make_preprocess(original):
        def preprocess_add_request(self, request, *args, **kwargs):
            extra = getattr(request.sampling_params, "extra_args", None)
            with _lock:
                check_request(self, request)
                pending = self.__dict__.setdefault(PENDING_ATTR, {})
                if has_steering_args(extra):
                    pending[request.request_id] = extra
            try:
                return original(self, request, *args, **kwargs)
            except BaseException:
                with _lock:
                    pending.pop(request.request_id, None)
                raise

        return preprocess_add_request

    def make_add(original):
        def add_request(self, request, *args, **kwargs):
            try:
                return original(self, request, *args, **kwargs)
            finally:
                with _lock:
                    getattr(self, PENDING_ATTR, {}).pop(request.request_id, None)

        return add_request

    def make_rpc(original):
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None, *more, **more_kwargs):
            def call():
                return original(self, method, timeout, args, kwargs, *more, **more_kwargs)

            if method == UPDATE_SET_RPC and is_enabled(self.vllm_config):
                return follow_set_update(self, call, args)
            return call()

        return collective_rpc

    return [wrap(EngineCore, "preprocess_add_request", make_preprocess), wrap(EngineCore, "add_request", make_add),
            wrap(EngineCore, "collective_rpc", make_rpc)]
