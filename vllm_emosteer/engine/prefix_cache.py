"""Prefix-cache keys of steered requests: results never depend on what the cache holds (warm == cold).

vLLM chains block hashes (each block's hash covers the blocks before it) and adds per-block "extra keys". A
steered request's KV is the unsteered model's before its first steered position (the last prompt token in
"response" mode, 0 in "all" mode) and its own from there on. So:

* blocks that end at or before that position get no steering key: they are shared with every request whose
  tokens there are the same, steered or not (a long system prompt hits the cache for all traffic);
* every block that reaches it gets ("emosteer", key, position): shared only with requests steered the same way
  (same spec, same vector-set digests) from the same position.

The front-end computes the key (it knows the sets' digests) and sends it inside the request's extra_args under
CACHE_KEY; a client may not send that key (refused at validation), and the user's own cache_salt is left as it
is, so no client-chosen value can ever produce a steering key. The engine core checks it (admission.py) and turns
it into block keys by wrapping vLLM's `generate_block_hash_extra_keys` (vllm_internals.py names where it lives:
BLOCK_KEY_MODULES).

KV-cache events (for KV-aware routers) publish each block's extra keys. vLLM publishes them untagged (a bare
string reads as a cache salt); the steering key is published whole, as the tuple that enters the block hash,
`("emosteer", key, position)`, last in the block's entry, so a router can hash a steered block as vLLM does
(wrapping `to_event_extra_keys`: EVENT_KEY_MODULES).

A chat whose history holds a steered answer: the next turn's prompt (history + answer + question) is steered
from its own last token, so its history is read unsteered, cold or warm alike; it reuses the cache of the
earlier turn only up to that turn's first steered position.
"""

from __future__ import annotations

import functools
import importlib

from .spec import SteeringSpec, first_steered_position
from .vllm_internals import BLOCK_KEY_MODULES, EVENT_KEY_MODULES, WRAPPED

CACHE_KEY = "_emosteer_cache"  # in extra_args: [key, positions]; set by the front-end only
TAG = "emosteer"  # the first element of a steering block key


def cache_entry(sets, spec: SteeringSpec) -> list:
    """The CACHE_KEY entry of a request steered by `spec` under `sets` (a VectorSets registry)."""
    return [f"{sets.digests_of(spec)}-{spec.fingerprint()}", spec.positions]


def steering_block_key(request, end_token_idx: int) -> tuple | None:
    """The block key of the block of `request` that ends at `end_token_idx`, or None."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None)
    entry = extra.get(CACHE_KEY) if isinstance(extra, dict) else None
    if entry is None:
        return None
    key, positions = entry
    first = first_steered_position(positions, request.num_prompt_tokens)
    return (TAG, key, first) if end_token_idx > first else None


def with_steering_keys(original):
    """vLLM's extra-keys function, plus the steering key on blocks that reach the first steered position."""

    @functools.wraps(original)
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, *args, **kwargs):
        keys, next_index = original(request, start_token_idx, end_token_idx, *args, **kwargs)
        steering = steering_block_key(request, end_token_idx)
        if steering is None:
            return keys, next_index
        return (*(keys or ()), steering), next_index

    setattr(generate_block_hash_extra_keys, WRAPPED, True)
    return generate_block_hash_extra_keys


def is_steering_key(key) -> bool:
    return isinstance(key, tuple) and len(key) == 3 and key[0] == TAG


def with_published_steering_keys(original):
    """vLLM's KV-event form of the extra keys, with each block's steering key published whole (last, as hashed)."""

    @functools.wraps(original)
    def to_event_extra_keys(extra_keys, *args, **kwargs):
        if not extra_keys:
            return original(extra_keys, *args, **kwargs)
        extra_keys = list(extra_keys)
        others = [None if keys is None else tuple(k for k in keys if not is_steering_key(k)) or None
                  for keys in extra_keys]
        published = original(others, *args, **kwargs) or [None] * len(extra_keys)
        entries = []
        for keys, entry in zip(extra_keys, published):
            steering = tuple(k for k in keys or () if is_steering_key(k))
            entries.append((*(entry or ()), *steering) if steering else entry)
        return entries

    setattr(to_event_extra_keys, WRAPPED, True)
    return to_event_extra_keys


def _wrap_by_name(modules: tuple[str, ...], name: str, make) -> list[str]:
    """Wrap a vLLM function where it is defined (modules[0], which must exist) and in every module that imported it
    by name."""
    patched = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            if module_name == modules[0]:
                raise
            continue
        function = getattr(module, name, None)
        if function is not None:
            if not getattr(function, WRAPPED, False):
                setattr(module, name, make(function))
            patched.append(f"{module_name}.{name}")
    return patched


def install() -> list[str]:
    """Engine core: the steering key in the block hashes, and published whole in KV events; wrapped in every module
    that took vLLM's function by name, so that hashes and KV events agree."""
    return (_wrap_by_name(BLOCK_KEY_MODULES, "generate_block_hash_extra_keys", with_steering_keys)
            + _wrap_by_name(EVENT_KEY_MODULES, "to_event_extra_keys", with_published_steering_keys))
