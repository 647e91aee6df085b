"""Capture mode's worker side without an engine: finished captures nobody takes are bounded, oldest out."""

import logging
from types import SimpleNamespace

import numpy as np
import torch

from vllm_emosteer.engine.capture_request import CAPTURE_KEY
from vllm_emosteer.engine.worker import capture
from vllm_emosteer.engine.worker.capture import Capture


def finish(cap: Capture, keys: list[str]) -> None:
    """One step in which a two-token capture request per key is computed and finishes."""
    ids = [f"req-{key}" for key in keys]
    requests = {i: SimpleNamespace(sampling_params=SimpleNamespace(extra_args={CAPTURE_KEY: {"key": k}}))
                for i, k in zip(ids, keys)}
    cap.prepare(ids, requests, np.full(len(ids), 2), np.tile([0, 1], len(ids)))
    for row in cap.local_rows:
        cap.add(torch.ones(2 * len(ids), cap.hidden_size), row)
    cap.finish(ids)


def test_finished_captures_are_bounded_oldest_out(monkeypatch, caplog):
    monkeypatch.setattr(capture, "MAX_FINISHED", 3)
    logging.getLogger("vllm.emosteer").addHandler(caplog.handler)  # vLLM's loggers do not propagate to the root
    try:
        cap = Capture(2, 4, torch.device("cpu"))
        cap.local_rows = [0, 1]
        finish(cap, ["a", "b"])
        finish(cap, ["c", "d", "e"])
    finally:
        logging.getLogger("vllm.emosteer").removeHandler(caplog.handler)
    assert list(cap.done) == ["c", "d", "e"] and cap.dropped == 2
    assert "dropped 2 finished capture(s)" in caplog.text and "at most 3" in caplog.text
    taken = cap.take()
    assert taken["e"]["count"] == 2 and torch.equal(taken["e"]["sums"], torch.full((2, 4), 2.0))
    finish(cap, ["f"])
    assert list(cap.take()) == ["f"] and cap.dropped == 2
