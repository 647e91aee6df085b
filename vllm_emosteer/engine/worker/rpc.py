"""The collective RPCs the front-end calls on every worker (installed as methods of vLLM's WorkerBase). Arguments and
results are bytes and JSON: vLLM's RPC encoder does not round-trip tensors nested in them."""

from __future__ import annotations

import json

import torch

from ...vectors.bank import EmotionBank
from ..vllm_internals import runtime_of


def update_set_on_worker(worker, name: str, vectors, metadata: str | None, source: str) -> str | None:
    """The worker side of UPDATE_SET_RPC: load (or replace) a set into its block of the bank, or unload it."""
    runtime = runtime_of(worker)
    if runtime is None:
        raise RuntimeError("emosteer: this worker has no steering runtime")
    bank = None
    if vectors is not None:
        meta = json.loads(metadata)
        shape = (len(meta["layers"]), len(meta["emotions"]), -1)
        tensor = torch.frombuffer(bytearray(vectors), dtype=torch.float32).reshape(shape)
        bank = EmotionBank.from_parts(tensor, meta, source)
    return runtime.update_set(name, bank, source)


def take_captures_on_worker(worker) -> dict:
    """The worker side of TAKE_CAPTURES_RPC: this rank's finished captures; tensor-parallel ranks other than 0
    hold the same values and send nothing."""
    from vllm.distributed import get_tensor_model_parallel_rank

    runtime = runtime_of(worker)
    if runtime is None or runtime.capture is None:
        raise RuntimeError("emosteer: this worker is not in capture mode")
    done = runtime.capture.take()
    if get_tensor_model_parallel_rank() != 0:
        return {}
    rows = runtime.capture.local_rows
    return {key: {"rows": rows, "count": item["count"], "sums": item["sums"].numpy().tobytes(),
                  "norms": [item["norms"][row].numpy().tobytes() for row in rows]} for key, item in done.items()}
