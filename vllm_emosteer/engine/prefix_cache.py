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
is, so no client-chosen value can ever produce a steering key. The engine core turns it into block keys by
wrapping vLLM's `generate_block_hash_extra_keys` (vllm_internals.py names where it lives: BLOCK_KEY_MODULES).

A chat whose history holds a steered answer: the next turn's prompt (history + answer + question) is steered
from its own last token, so its history is read unsteered, cold or warm alike; it reuses the cache of the
earlier turn only up to that turn's first steered position.
"""

from __future__ import annotations

import functools
import importlib

from .spec import SteeringSpec, first_steered_position
from .vllm_internals import BLOCK_KEY_MODULES, WRAPPED

CACHE_KEY = "_emosteer_cache"  # in extra_args: [key, positions]; set by the front-end only


def cache_entry(set_digests: str, spec: SteeringSpec) -> list:
    return [f"{set_digests}-{spec.fingerprint()}", spec.positions]


def steering_block_key(request, end_token_idx: int) -> tuple | None:
    """The block key of the block of `request` that ends at `end_token_idx`, or None."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None)
    entry = extra.get(CACHE_KEY) if isinstance(extra, dict) else None
    if entry is None:
        return None
    key, positions = entry
    first = first_steered_position(positions, request.num_prompt_tokens)
    return ("emosteer", key, first) if end_token_idx > first else None


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


def install() -> list[str]:
    """Engine core: the steering key in the block hashes, wrapped in every module that took vLLM's function by
    name, so that hashes and KV events agree."""
    patched = []
    for name in BLOCK_KEY_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            if name == BLOCK_KEY_MODULES[0]:  # where the hashes are made: without it, refuse to run
                raise
            continue
        function = getattr(module, "generate_block_hash_extra_keys", None)
        if function is not None:
            if not getattr(function, WRAPPED, False):
                module.generate_block_hash_extra_keys = with_steering_keys(function)
            patched.append(f"{name}.generate_block_hash_extra_keys")
    return patched
