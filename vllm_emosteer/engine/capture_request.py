"""A capture request (capture mode, worker/capture.py): `{"emosteer_capture": {"key": K, "from": F, "norms_from": N}}`
in extra_args; parsed by the front-end (validation) and by the workers (accumulation)."""

from __future__ import annotations

CAPTURE_KEY = "emosteer_capture"


class CaptureError(ValueError):
    pass


def parse_capture(extra_args) -> tuple[str, int, int] | None:
    """(key, from, norms_from) of a capture request, None for any other request."""
    block = extra_args.get(CAPTURE_KEY) if isinstance(extra_args, dict) else None
    if block is None:
        return None
    if not isinstance(block, dict) or set(block) - {"key", "from", "norms_from"} or not isinstance(
            block.get("key"), str):
        raise CaptureError(f"{CAPTURE_KEY} must be {{\"key\": str, \"from\": int, \"norms_from\": int}}, got {block!r}")
    first, norms_from = block.get("from", 0), block.get("norms_from", block.get("from", 0))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (first, norms_from)):
        raise CaptureError(f"{CAPTURE_KEY}: 'from' and 'norms_from' must be non-negative integers, got {block!r}")
    return block["key"], first, norms_from
