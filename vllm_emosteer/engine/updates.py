"""Vector sets loaded, replaced and unloaded while the engine runs, the way vLLM loads LoRA adapters at run time.

* Off unless the operator sets VLLM_EMOSTEER_ALLOW_RUNTIME_UPDATES=1; files only from the folder named by the
  `sets_dir` option (no absolute path, no `..`, no symlink out of it); room for `max_sets` sets, fixed at start.
* Workers first: a collective RPC writes the set's block of the device bank in place, between steps. Then the
  front-end's registry, so that no request is accepted for a set the workers lack.
* Unloading or replacing a set is refused (HTTP 409) while unfinished requests of this front-end use it: a
  request never changes vectors halfway. While a change is under way, requests that name the set get a 400.
* The prefix-cache salt of a steered request holds the digests of the sets it uses, so a set replaced under the
  same name never reuses the old set's KV cache.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path

import torch

from ..serving import metrics
from ..vectors.bank import BankError, EmotionBank
from .sets import check_set_name
from .spec import referenced_sets

ALLOW_ENV = "VLLM_EMOSTEER_ALLOW_RUNTIME_UPDATES"
RPC_METHOD = "emosteer_update_set"
PENDING_TTL_S = 60.0  # a validated request that never reached the output processor stops counting after this


class SetUpdateError(ValueError):
    """A refused runtime change of the vector sets; `status` is its HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(f"emosteer: {message}")
        self.status = status


class SetUsage:
    """Which unfinished requests of this front-end use which sets (None: the default set).

    A request counts from its validation (process_inputs, maybe on a tokenizer thread) until the output
    processor forgets it (finished or aborted); validation and the unload check take the same lock."""

    def __init__(self):
        self.lock = threading.RLock()
        self._tokens = itertools.count()
        self.pending: dict[int, tuple[frozenset, float]] = {}  # validated, not yet in the output processor
        self.by_request: dict[int, int] = {}  # id(EngineCoreRequest) -> its pending token
        self.in_flight: dict[str, frozenset] = {}  # internal request id -> sets

    def hold(self, sets) -> int:
        """Count a request just validated (call under `lock`, with the validation)."""
        with self.lock:
            token = next(self._tokens)
            self.pending[token] = (frozenset(sets), time.monotonic())
            return token

    def attach(self, token: int, request) -> None:
        with self.lock:
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

    def users(self, name: str, default: str, live) -> int:
        """Unfinished requests that use set `name`; `live`: the output processor's unfinished request ids."""
        match = {name, None} if name == default else {name}
        now = time.monotonic()
        with self.lock:
            self.pending = {t: v for t, v in self.pending.items() if now - v[1] < PENDING_TTL_S}
            self.in_flight = {r: s for r, s in self.in_flight.items() if r in live}
            return (sum(1 for sets, _ in self.pending.values() if sets & match)
                    + sum(1 for sets in self.in_flight.values() if sets & match))


usage = SetUsage()


def set_file(sets_dir: Path | None, file) -> Path:
    """The file a load names, inside sets_dir, or a SetUpdateError."""
    if sets_dir is None:
        raise SetUpdateError("runtime loads need the sets_dir option (the folder vector sets may be loaded from)",
                             403)
    if not isinstance(file, str) or not file:
        raise SetUpdateError(f"'file' must be a path relative to sets_dir, got {file!r}", 400)
    relative = Path(file)
    if relative.is_absolute() or ".." in relative.parts:
        raise SetUpdateError(f"'file' must be a path inside sets_dir without '..', got {file!r}", 400)
    path = (sets_dir / relative).resolve()
    if not path.is_relative_to(sets_dir):
        raise SetUpdateError(f"'file' {file!r} leads outside sets_dir (a symlink?)", 400)
    if not path.is_file():
        raise SetUpdateError(f"no file {file!r} in sets_dir", 404)
    return path


class FrontEnd:
    """One front-end's view: its options (registry), its output processor and its model config."""

    def __init__(self, options, output_processor, hf_config):
        self.options, self.output_processor, self.hf_config = options, output_processor, hf_config

    @property
    def sets(self):
        return self.options.sets

    def _allowed(self, action: str) -> None:
        if os.environ.get(ALLOW_ENV) != "1":
            self._refuse(action, f"runtime changes of vector sets are off; the operator turns them on with "
                                 f"{ALLOW_ENV}=1", 403)

    def _refuse(self, action: str, message: str, status: int):
        metrics.count_set_update(action, "refused")
        raise SetUpdateError(message, status)

    def begin_load(self, name, file, replace: bool) -> tuple[EmotionBank, str]:
        action = "replace" if replace else "load"
        self._allowed(action)
        try:
            check_set_name(name)
        except BankError as exc:
            self._refuse(action, str(exc), 400)
        try:
            path = set_file(self.options.sets_dir, file)
        except SetUpdateError as exc:
            self._refuse(action, str(exc).removeprefix("emosteer: "), exc.status)
        try:
            bank = EmotionBank.load(path)
            bank.check_fits(self.hf_config)
            self.sets.check(name, bank)
        except BankError as exc:
            self._refuse(action, f"set {name!r}: {exc}", 400)
        with usage.lock:
            if name in self.sets.busy:
                self._refuse(action, f"set {name!r} is being changed by another call", 409)
            if replace:
                self._check_unused(action, name)
            elif name in self.sets.sets:
                self._refuse(action, f"a set named {name!r} is loaded; unload it first or pass replace: true", 409)
            elif len(set(self.sets.sets) | self.sets.busy) >= self.sets.max_sets:
                self._refuse(action, f"no room: all {self.sets.max_sets} sets are loaded (option max_sets)", 409)
            self.sets.set_busy(name, True)
        return bank, str(path)

    def _check_unused(self, action: str, name: str) -> None:
        if name not in self.sets.sets:
            self._refuse(action, f"unknown vector set {name!r}; loaded: {list(self.sets.sets)}", 404)
        users = usage.users(name, self.sets.default.name, self.output_processor.request_states)
        if users:
            self._refuse(action, f"set {name!r} is used by {users} unfinished request(s); retry when they finish",
                         409)

    def commit_load(self, name: str, bank: EmotionBank, source: str, replace: bool) -> dict:
        with usage.lock:
            self.sets.add(name, bank, source)
            self.sets.set_busy(name, False)
        metrics.count_set_update("replace" if replace else "load", "ok")
        metrics.SETS_LOADED.set(len(self.sets.sets))
        return next(s for s in self.sets.describe() if s["name"] == name)

    def begin_unload(self, name) -> None:
        self._allowed("unload")
        with usage.lock:
            if name in self.sets.busy:
                self._refuse("unload", f"set {name!r} is being changed by another call", 409)
            self._check_unused("unload", name)
            if name == self.sets.default.name:
                self._refuse("unload", f"{name!r} is the default set; it can be replaced, not unloaded", 409)
            self.sets.set_busy(name, True)

    def commit_unload(self, name: str) -> None:
        with usage.lock:
            self.sets.remove(name)
            self.sets.set_busy(name, False)
        metrics.count_set_update("unload", "ok")
        metrics.SETS_LOADED.set(len(self.sets.sets))

    def abort(self, name: str, action: str) -> None:
        with usage.lock:
            self.sets.set_busy(name, False)
        metrics.count_set_update(action, "failed")


def rpc_args(name: str, bank: EmotionBank | None, source: str = "") -> tuple:
    """Plain bytes and JSON: vLLM's RPC encoder does not round-trip tensors nested in the args tuple."""
    if bank is None:
        return (name, None, None, "")
    return (name, bank.vectors.numpy().tobytes(), json.dumps(bank.metadata()), source)


def _front_end_of(engine) -> FrontEnd:
    """`engine`: an `LLM`, an `LLMEngine` or an `AsyncLLM` (vLLM's engine client in `vllm serve`)."""
    from .options import is_enabled
    from .plugin import frontend_options

    engine = getattr(engine, "llm_engine", engine)
    processor = engine.input_processor
    if not is_enabled(processor.vllm_config):
        raise SetUpdateError("steering is not enabled on this engine", 404)
    return FrontEnd(frontend_options(processor), engine.output_processor, processor.vllm_config.model_config.hf_config)


def load_set(llm, name: str, file: str, replace: bool = False) -> dict:
    """Load the vector set `file` (relative to the engine's sets_dir) as `name`; returns its description."""
    front = _front_end_of(llm)
    bank, source = front.begin_load(name, file, replace)
    try:
        llm.collective_rpc(RPC_METHOD, args=rpc_args(name, bank, source))
    except BaseException:
        front.abort(name, "replace" if replace else "load")
        raise
    return front.commit_load(name, bank, source, replace)


def unload_set(llm, name: str) -> None:
    """Unload the vector set `name`; refused while unfinished requests use it."""
    front = _front_end_of(llm)
    front.begin_unload(name)
    try:
        llm.collective_rpc(RPC_METHOD, args=rpc_args(name, None))
    except BaseException:
        front.abort(name, "unload")
        raise
    front.commit_unload(name)


async def load_set_async(engine_client, name: str, file: str, replace: bool = False) -> dict:
    front = _front_end_of(engine_client)
    bank, source = front.begin_load(name, file, replace)
    try:
        await engine_client.collective_rpc(RPC_METHOD, args=rpc_args(name, bank, source))
    except BaseException:
        front.abort(name, "replace" if replace else "load")
        raise
    return front.commit_load(name, bank, source, replace)


async def unload_set_async(engine_client, name: str) -> None:
    front = _front_end_of(engine_client)
    front.begin_unload(name)
    try:
        await engine_client.collective_rpc(RPC_METHOD, args=rpc_args(name, None))
    except BaseException:
        front.abort(name, "unload")
        raise
    front.commit_unload(name)


def update_set_on_worker(worker, name: str, vectors, metadata: str | None, source: str) -> str | None:
    """The worker side of RPC_METHOD (installed as a method of vLLM's WorkerBase)."""
    runtime = getattr(getattr(worker, "model_runner", None), "_emosteer", None)
    if runtime is None:
        raise RuntimeError("emosteer: this worker has no steering runtime")
    bank = None
    if vectors is not None:
        meta = json.loads(metadata)
        shape = (len(meta["layers"]), len(meta["emotions"]), -1)
        tensor = torch.frombuffer(bytearray(vectors), dtype=torch.float32).reshape(shape)
        bank = EmotionBank.from_parts(tensor, meta, source)
    return runtime.update_set(name, bank, source)
