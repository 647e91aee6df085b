"""Vector sets loaded, replaced and unloaded while the engine runs, the way vLLM loads LoRA adapters at run time.

* Off unless the operator sets VLLM_EMOSTEER_ALLOW_RUNTIME_UPDATES=1; files only from the folder named by the
  `sets_dir` option (no absolute path, no `..`, no symlink out of it); room for `max_sets` sets, fixed at start.
* Workers first: a collective RPC writes the set's block of the device bank in place, between steps. Then the
  front-end's registry, so that no request is accepted for a set the workers lack.
* Unloading or replacing a set is refused (HTTP 409) while unfinished requests of this front-end use it: a
  request never changes vectors halfway. While a change is under way, requests that name the set get a 400.
* The prefix-cache key of a steered request holds the digests of the sets it uses, so a set replaced under the
  same name never reuses the old set's KV cache.
* Refused with several API servers (`--api-server-count`): each keeps its own registry, and they would disagree.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import contextmanager
from pathlib import Path

from ...vectors.bank import BankError, EmotionBank
from .. import metrics
from ..options import EmosteerOptions
from ..sets import VectorSets, check_set_name, update_args
from ..vllm_internals import UPDATE_SET_RPC, api_server_count
from .usage import usage

ALLOW_ENV = "VLLM_EMOSTEER_ALLOW_RUNTIME_UPDATES"


class SetUpdateError(ValueError):
    """A refused runtime change of the vector sets; `status` is its HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(f"emosteer: {message}")
        self.status = status





def set_file(sets_dir: Path | None, file) -> Path:
    """The file a load names, inside sets_dir, or a SetUpdateError."""
    if sets_dir is None:
        raise SetUpdateError("runtime loads need the sets_dir option (the folder vector sets may be loaded from)",
                             403)
    if not isinstance(file, str) or not file:
        raise SetUpdateError(f"'file' must be a path relative to sets_dir, got {file!r}", 400)
    relative = Path(file)
    if relative.is_absolute() or ".." in relative.parts or "\0" in file:
        raise SetUpdateError(f"'file' must be a path inside sets_dir without '..', got {file!r}", 400)
    try:
        path = (sets_dir / relative).resolve()
        if not path.is_relative_to(sets_dir):
            raise SetUpdateError(f"'file' {file!r} leads outside sets_dir (a symlink?)", 400)
        found = path.is_file()
    except OSError as exc:  # a name too long for the file system, a loop of symlinks, ...
        raise SetUpdateError(f"'file' {file[:80]!r} cannot be opened in sets_dir ({exc.strerror or exc})", 400) \
            from None
    if not found:
        raise SetUpdateError(f"no file {file!r} in sets_dir", 404)
    return path


class FrontEnd:
    """One front-end's view: its options (registry), its output processor, its model config and how many API
    servers share the engine (each has its own registry)."""

    def __init__(self, options: EmosteerOptions, output_processor, hf_config, api_servers: int = 1):
        self.options, self.output_processor, self.hf_config = options, output_processor, hf_config
        self.api_servers = api_servers

    @property
    def sets(self) -> VectorSets:
        return self.options.sets

    def _allowed(self, action: str) -> None:
        if os.environ.get(ALLOW_ENV) != "1":
            self._refuse(action, f"runtime changes of vector sets are off; the operator turns them on with "
                                 f"{ALLOW_ENV}=1", 403)
        if self.api_servers > 1:
            self._refuse(action, f"runtime changes of vector sets need one API server; this engine has "
                                 f"{self.api_servers} (--api-server-count), whose registries would disagree", 403)

    def _refuse(self, action: str, message: str, status: int):
        metrics.count_set_update(action, "refused")
        raise SetUpdateError(message, status)

    def begin_load(self, name, file, replace: bool) -> tuple[EmotionBank, str]:
        """Check a load and read its file (slow for a large file: the async API runs it on a thread); returns the
        bank and the name it is shown by (its path relative to sets_dir)."""
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
            bank = EmotionBank.load(path, name=file)
            bank.check_fits(self.hf_config)
            self.sets.check(name, bank)
        except BankError as exc:
            self._refuse(action, f"set {name!r}: {exc}", 400)
        with usage.lock:
            if name in self.sets.busy:
                self._refuse(action, f"set {name!r} is being changed by another call", 409)
            if replace:
                self._check_unused(action, name)
            elif name in self.sets.by_name:
                self._refuse(action, f"a set named {name!r} is loaded; unload it first or pass replace: true", 409)
            elif len(set(self.sets.by_name) | self.sets.busy) >= self.sets.max_sets:
                self._refuse(action, f"no room: all {self.sets.max_sets} sets are loaded (option max_sets)", 409)
            self.sets.set_busy(name, True)
        return bank, file

    def _check_unused(self, action: str, name: str) -> None:
        if name not in self.sets.by_name:
            self._refuse(action, f"unknown vector set {name!r}; loaded: {list(self.sets.by_name)}", 404)
        users = usage.users(name, self.sets.default.name, self.output_processor.request_states)
        if users:
            self._refuse(action, f"set {name!r} is used by {users} unfinished request(s); retry when they finish",
                         409)

    def begin_unload(self, name) -> None:
        self._allowed("unload")
        with usage.lock:
            if name in self.sets.busy:
                self._refuse("unload", f"set {name!r} is being changed by another call", 409)
            self._check_unused("unload", name)
            if name == self.sets.default.name:
                self._refuse("unload", f"{name!r} is the default set; it can be replaced, not unloaded", 409)
            self.sets.set_busy(name, True)

    @contextmanager
    def changing(self, name: str, action: str):
        """Around the workers' RPC of a change begun above: on any failure the set is no longer busy, the
        registry is unchanged, the failure is counted, and the caller gets a SetUpdateError (503)."""
        try:
            yield
        except BaseException as exc:
            with usage.lock:
                self.sets.set_busy(name, False)
            metrics.count_set_update(action, "failed")
            if isinstance(exc, Exception):
                raise SetUpdateError(f"{action} of set {name!r} failed in the engine: {type(exc).__name__}: {exc}",
                                     503) from exc
            raise

    def commit(self, name: str, action: str, bank: EmotionBank | None = None, source: str = "") -> dict | None:
        """The workers hold the change: the registry takes it (bank None: unloaded)."""
        with usage.lock:
            if bank is None:
                self.sets.remove(name)
            else:
                self.sets.add(name, bank, source)
            self.sets.set_busy(name, False)
        metrics.count_set_update(action, "ok")
        metrics.SETS_LOADED.set(len(self.sets.by_name))
        return None if bank is None else next(s for s in self.sets.describe() if s["name"] == name)


def front_end_of(engine) -> FrontEnd:
    """`engine`: an `LLM`, an `LLMEngine` or an `AsyncLLM` (vLLM's engine client in `vllm serve`)."""
    from ..options import frontend_options, is_enabled

    engine = getattr(engine, "llm_engine", engine)
    processor = engine.input_processor
    config = processor.vllm_config
    if not is_enabled(config):
        raise SetUpdateError("steering is not enabled on this engine", 404)
    return FrontEnd(frontend_options(processor), engine.output_processor, config.model_config.hf_config,
                    api_server_count(config))


def load_set(llm, name: str, file: str, replace: bool = False) -> dict:
    """Load the vector set `file` (relative to the engine's sets_dir) as `name`; returns its description."""
    front = front_end_of(llm)
    bank, source = front.begin_load(name, file, replace)
    action = "replace" if replace else "load"
    with front.changing(name, action):
        llm.collective_rpc(UPDATE_SET_RPC, args=update_args(name, bank, source))
    return front.commit(name, action, bank, source)


def unload_set(llm, name: str) -> None:
    """Unload the vector set `name`; refused while unfinished requests use it."""
    front = front_end_of(llm)
    front.begin_unload(name)
    with front.changing(name, "unload"):
        llm.collective_rpc(UPDATE_SET_RPC, args=update_args(name, None))
    front.commit(name, "unload")


async def load_set_async(engine_client, name: str, file: str, replace: bool = False) -> dict:
    """`load_set` for vLLM's async engine client; the file is read on a thread, off the event loop."""
    front = front_end_of(engine_client)
    bank, source = await asyncio.to_thread(front.begin_load, name, file, replace)
    action = "replace" if replace else "load"
    with front.changing(name, action):
        await engine_client.collective_rpc(UPDATE_SET_RPC, args=update_args(name, bank, source))
    return front.commit(name, action, bank, source)


async def unload_set_async(engine_client, name: str) -> None:
    front = front_end_of(engine_client)
    front.begin_unload(name)
    with front.changing(name, "unload"):
        await engine_client.collective_rpc(UPDATE_SET_RPC, args=update_args(name, None))
    front.commit(name, "unload")
