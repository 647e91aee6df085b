"""Capture mode, for extraction inside vLLM: per request, the hooked activation summed over chosen positions.

An engine started with `{"emosteer": {"capture": "attn_out"}}` (or "residual") hooks every layer. A request whose
extra_args hold `{"emosteer_capture": {"key": K, "from": F, "norms_from": N}}` (a prompt only, max_tokens 1)
gets, at every layer, the fp32 sum of the hooked activation over its prompt positions >= F, and the token
norms at positions >= N, accumulated on the device across prefill chunks. `take_captures` (a collective RPC,
`extraction/vllm_capture.py`) returns them by key: tensor-parallel ranks hold the same values (rank 0 answers),
pipeline stages each answer for their own layers.

Capture runs eagerly (no compilation, no CUDA graphs) and without prefix caching: a cached token is never
computed, so it could not be captured. The engine refuses to start otherwise.

Finished captures wait for `take_captures`; at most MAX_FINISHED of them: beyond that the oldest are dropped,
counted and logged, so captures nobody collects cannot grow without bound.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..capture_request import parse_capture

logger = logging.getLogger("vllm.emosteer")
# finished captures kept until taken: extraction takes all of its samples at once, 1,100 at most for the bundled
# recipes (a pairs file gives two per pair)
MAX_FINISHED = 10_000


class Capture:
    """The worker side: accumulators per capture request, filled by the hooks, handed out by key."""

    def __init__(self, num_rows: int, hidden_size: int, device: torch.device):
        self.num_rows, self.hidden_size, self.device = num_rows, hidden_size, device
        self.local_rows: list[int] = []  # set by the plugin: the rows hooked on this rank
        self.pool = torch.zeros(0, num_rows, hidden_size, device=device)  # fp32 sums, one row per request
        self.free: list[int] = []
        self.of_request: dict[str, tuple[int, str, int, int]] = {}  # req_id -> (pool row, key, from, norms_from)
        self.counts: dict[int, int] = {}
        self.norms: dict[int, list[dict[int, torch.Tensor]]] = {}  # pool row -> per step, per row: token norms
        # this step's token index and pool row per summed token, and per pool row the indices of its normed tokens
        self.step: tuple[torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor]]] | None = None
        self.done: dict[str, dict] = {}  # by key, oldest first
        self.dropped = 0  # finished captures dropped unread (MAX_FINISHED)

    def _admit(self, req_id: str, request) -> None:
        spec = parse_capture(getattr(getattr(request, "sampling_params", None), "extra_args", None))
        if spec is None:
            self.of_request[req_id] = None
            return
        if not self.free:
            grown = self.pool.shape[0] * 2 or 8
            self.free = list(range(grown - 1, self.pool.shape[0] - 1, -1))
            self.pool = torch.cat([self.pool, torch.zeros(grown - self.pool.shape[0], self.num_rows,
                                                          self.hidden_size, device=self.device)])
        slot = self.free.pop()
        self.pool[slot].zero_()
        self.counts[slot], self.norms[slot] = 0, []
        self.of_request[req_id] = (slot, *spec)

    def prepare(self, req_ids, requests, num_tokens_per_req: np.ndarray, positions: np.ndarray) -> None:
        for req_id in req_ids:
            if req_id not in self.of_request:
                self._admit(req_id, requests[req_id])
        entries = [self.of_request[r] for r in req_ids]
        if all(e is None for e in entries):
            self.step = None
            return
        slot = np.repeat([e[0] if e else -1 for e in entries], num_tokens_per_req)
        first = np.repeat([e[2] if e else 0 for e in entries], num_tokens_per_req)
        norms_from = np.repeat([e[3] if e else 0 for e in entries], num_tokens_per_req)
        summed = np.flatnonzero((slot >= 0) & (positions >= first))
        normed = np.flatnonzero((slot >= 0) & (positions >= norms_from))
        for s, n in zip(*np.unique(slot[summed], return_counts=True)):
            self.counts[int(s)] += int(n)
        groups = []
        for s in np.unique(slot[normed]):
            self.norms[int(s)].append({})
            groups.append((int(s), torch.from_numpy(normed[slot[normed] == s]).to(self.device)))
        self.step = (torch.from_numpy(summed).to(self.device), torch.from_numpy(slot[summed]).to(self.device), groups)

    def add(self, x: torch.Tensor, row: int) -> None:
        """Called by the hook of bank row `row` with the hooked activation [T, H] (before any steering)."""
        if self.step is None:
            return
        index, slots, groups = self.step
        self.pool[:, row].index_add_(0, slots, x[index].float())
        for s, tokens in groups:
            self.norms[s][-1][row] = x[tokens].float().norm(dim=-1).cpu()

    def restart(self, req_ids) -> None:
        """Preempted requests compute their prompt again from the start: drop what they had summed."""
        for req_id in req_ids:
            entry = self.of_request.get(req_id)
            if entry is not None:
                self.pool[entry[0]].zero_()
                self.counts[entry[0]], self.norms[entry[0]] = 0, []

    def finish(self, req_ids) -> None:
        for req_id in req_ids:
            entry = self.of_request.pop(req_id, None)
            if entry is None:
                continue
            slot, key = entry[0], entry[1]
            norms = {row: torch.cat([step[row] for step in self.norms[slot] if row in step] or [torch.zeros(0)])
                     for row in self.local_rows}
            self.done.pop(key, None)  # a key given again counts as the newest
            self.done[key] = {"sums": self.pool[slot, self.local_rows].cpu(), "count": self.counts.pop(slot),
                              "norms": norms}
            self.norms.pop(slot)
            self.free.append(slot)
        excess = len(self.done) - MAX_FINISHED
        if excess > 0:
            for key in list(self.done)[:excess]:
                del self.done[key]
            self.dropped += excess
            logger.warning("emosteer: capture mode dropped %d finished capture(s) nobody took (the oldest; it keeps "
                           "at most %d until take_captures); %d dropped so far", excess, MAX_FINISHED, self.dropped)

    def take(self) -> dict[str, dict]:
        done, self.done = self.done, {}
        return done
