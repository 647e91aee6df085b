"""Which unfinished requests of this front-end use which vector sets: an unload or a replace is refused while any
does (set_changes.py)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict

from ..spec import referenced_sets

PENDING_TTL_S = 60.0  # a validated request that never reached the output processor stops counting after this


class SetUsage:
    """Which unfinished requests of this front-end use which sets (None: the default set).

    A request counts from its validation (process_inputs, maybe on a tokenizer thread) until the output
    processor finishes or aborts it; validation and the unload check take the same lock. Nothing outlives its
    request: a validated request that never reaches the output processor stops counting after PENDING_TTL_S."""

    def __init__(self):
        self.lock = threading.RLock()
        self._tokens = itertools.count()
        # validated, not yet in the output processor: token -> (sets, time, id of its EngineCoreRequest or None)
        self.pending: OrderedDict[int, tuple[frozenset, float, int | None]] = OrderedDict()
        self.by_request: dict[int, int] = {}  # id(EngineCoreRequest) -> its pending token
        self.in_flight: dict[str, frozenset] = {}  # internal request id -> sets

    def _expire(self, now: float) -> None:
        while self.pending:
            token, (_, since, request_key) = next(iter(self.pending.items()))
            if now - since < PENDING_TTL_S:
                return
            del self.pending[token]
            self.by_request.pop(request_key, None)

    def hold(self, sets) -> int:
        """Count a request just validated (call under `lock`, with the validation)."""
        with self.lock:
            now = time.monotonic()
            self._expire(now)
            token = next(self._tokens)
            self.pending[token] = (frozenset(sets), now, None)
            return token

    def attach(self, token: int, request) -> None:
        with self.lock:
            if token in self.pending:
                sets, since, _ = self.pending[token]
                self.pending[token] = (sets, since, id(request))
                self.by_request[id(request)] = token

    def release(self, token: int) -> None:
        with self.lock:
            self.pending.pop(token, None)

    def registered(self, request) -> None:
        """The output processor took the request (called after its add_request)."""
        sets = referenced_sets(getattr(request.sampling_params, "extra_args", None))
        with self.lock:
            token = self.by_request.pop(id(request), None)
            if token is not None:
                self.pending.pop(token, None)
            if sets:
                self.in_flight[request.request_id] = frozenset(sets)

    def finished(self, request_ids) -> None:
        """The output processor finished or aborted these requests."""
        with self.lock:
            for request_id in request_ids:
                self.in_flight.pop(request_id, None)

    def held(self) -> int:
        """How many entries this front-end holds (all of them belong to unfinished requests)."""
        with self.lock:
            return len(self.pending) + len(self.by_request) + len(self.in_flight)

    def users(self, name: str, default: str, live) -> int:
        """Unfinished requests that use set `name`; `live`: the output processor's unfinished request ids."""
        match = {name, None} if name == default else {name}
        with self.lock:
            self._expire(time.monotonic())
            return (sum(1 for sets, _, _ in self.pending.values() if sets & match)
                    + sum(1 for r, sets in self.in_flight.items() if sets & match and r in live))


usage = SetUsage()
