"""The collective RPCs the front-end calls on every worker (installed as methods of vLLM's WorkerBase). Arguments and
results are bytes and JSON: vLLM's RPC encoder does not round-trip tensors nested in them."""

from __future__ import annotations

from ..sets import bank_of_update
from ..vllm_internals import runtime_of


def update_set_on_worker(worker, name: str, vectors, metadata: str | None, source: str) -> str | None:
    """The worker side of UPDATE_SET_RPC: load (or replace) a set into its block of the bank, or unload it."""
    runtime = runtime_of(worker)
    if runtime is None:
        raise RuntimeError("emosteer: this worker has no steering runtime")
    bank = bank_of_update(vectors, metadata, source)
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
