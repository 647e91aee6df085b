"""Per-step steering state of one model runner: persistent buffers refreshed in place before each forward.

* `device_vectors[L, C, H]` (fp32): the vector sets' blocks (`sets.py`), one bank row per hooked layer; a set
  loaded at run time is written in place.
* `coeff[slot, L, C]` (fp32): each steered request owns a slot while it is scheduled; its alphas are
  written once, when it gets the slot (zero outside the request's layer range).
* `row_of_token[T_max]` (int32): for each token of the flattened batch, its request's slot, or -1 when the
  token is not steered (unsteered request, prompt token in "response" mode, padding).

They are allocated once, before profiling, compilation and graph capture, and never reallocated. On CPU the host
arrays are the device tensors; on CUDA each step's values go up through a round-robin of pinned host buffers
(vLLM's `UvaBufferPool`, as Model Runner V2 does for its own inputs), so that writing step N+1's rows never touches
a host buffer that step N's copy may still be reading (async scheduling), whichever runner drives the steps.
Compiled graphs and CUDA graphs read them as tensors (on CUDA the op; compiled on CPU, plain torch ops that gather from
`slot_offsets`, the host plan's per-slot table, or from coeff and bank where there is no table), so they see new
values at every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.utils import CpuGpuBuffer

from ...vectors.bank import EmotionBank
from .capture import Capture
from .ops import kernel_runs_on, steer_add_eager
from ..options import EmosteerOptions
from ..prefix_cache import CACHE_KEY, cache_entry
from ..spec import SteeringError, SteeringSpec, first_steered_position, parse_steering

logger = logging.getLogger("vllm.emosteer")  # a child of "vllm": vLLM's log handlers and level apply
UNSTEERED = -1
NEVER = np.iinfo(np.int64).max
SLOT_OFFSETS_LIMIT = 1 << 25  # floats (128 MiB): largest per-slot offset table [slots, L, H] kept for the host plan


@dataclass
class StepPlan:
    """This step's steering, from the host's view: `steered` of the first `total` tokens are steered; `index` holds
    their positions (None: all of them). On CPU, their offsets come from the per-slot table `slot_offsets`: `slot`
    when one slot serves them all, else `token_slots` (the slot of each steered token)."""

    total: int
    steered: int = 0
    index: torch.Tensor | None = None
    slot: int | None = None
    token_slots: torch.Tensor | None = None


class SteeringRuntime:
    def __init__(self, options: EmosteerOptions, max_tokens: int, max_slots: int, device: torch.device,
                 max_steps_in_flight: int = 2):
        self.options = options
        self.device_vectors = options.sets.device_bank(device)  # fp32 [L, C, H]
        L, E, H = self.device_vectors.shape
        self.row_of_token = CpuGpuBuffer(max_tokens, dtype=torch.int32, device=device, pin_memory=False)
        self.coeff = CpuGpuBuffer(max_slots, L, E, dtype=torch.float32, device=device, pin_memory=False)
        self.uploads = None
        if device.type == "cpu":  # one tensor serves both sides
            self.row_of_token.gpu = self.row_of_token.cpu
            self.coeff.gpu = self.coeff.cpu
        else:
            from vllm.v1.worker.gpu.buffer_utils import UvaBufferPool

            depth = max(2, max_steps_in_flight)
            self.uploads = {"rows": UvaBufferPool(max_tokens, torch.int32, depth),
                            "coeff": UvaBufferPool((max_slots, L, E), torch.float32, depth)}
        self.row_of_token.np.fill(UNSTEERED)
        self.row_of_token.gpu.fill_(UNSTEERED)
        self.start_of_slot = np.zeros(max_slots, dtype=np.int64)  # first steered position of the slot's request
        self.slot_of: dict[str, int] = {}  # scheduled request -> slot (UNSTEERED for unsteered requests)
        self.free_slots = list(range(max_slots - 1, -1, -1))
        self.coeff_dirty = False
        self.steered_upto = 0  # rows[:steered_upto] may hold stale slots
        self.segments: list[tuple[int, int, int]] = []  # mode "naive" only: (first token, end, slot) per request
        # Host-side plan of the step, for forwards that run eagerly (set by install_steering: CPU, or CUDA without
        # CUDA graphs). Compiled graphs and captured CUDA graphs never read it: they always run the add.
        self.capture = Capture(L, H, device) if options.capture else None  # capture mode (extraction)
        self.host_plan = False
        self.plan: StepPlan | None = None
        self.hooks_ran = False  # a hooked forward has run (and checked the hooked tensors' shapes)
        self.where = ""  # which model runner drives it and which path the add takes (the start-up log's words)
        # CPU host plan: each slot's offsets at every bank row, [slots, L, H] fp32, computed once when a request
        # gets the slot, so that a steered layer costs one small add (no per-step or per-layer matmul); compiled CPU
        # graphs gather from it too (hooks._steer), so eager and compiled add the same fp32 offsets
        self.slot_offsets: torch.Tensor | None = None
        self.offset_rows: list[tuple[torch.Tensor, ...]] = []  # per slot, its [H] offset at each bank row (views)
        if device.type == "cpu" and not kernel_runs_on(device) and max_slots * L * H <= SLOT_OFFSETS_LIMIT:
            self.slot_offsets = torch.zeros(max_slots, L, H)
            self.offset_rows = [self.slot_offsets[slot].unbind(0) for slot in range(max_slots)]

    def register_buffers(self, model: torch.nn.Module) -> None:
        """Make the device tensors non-persistent buffers of the model: vLLM's sleep mode (level 2) discards the
        weights pool they live in and restores only parameters and named buffers."""
        for name, tensor in (("bank", self.device_vectors), ("rows", self.row_of_token.gpu), ("coeff", self.coeff.gpu)):
            model.register_buffer(f"emosteer_{name}", tensor, persistent=False)

    # ---- request lifetime -------------------------------------------------------------------------------
    def forget(self, req_ids, preempted: bool = False) -> None:
        """Finished, aborted or preempted requests give their slot back."""
        if self.capture is not None:
            (self.capture.restart if preempted else self.capture.finish)(req_ids)
        for req_id in req_ids:
            slot = self.slot_of.pop(req_id, UNSTEERED)
            if slot != UNSTEERED:
                self.free_slots.append(slot)

    def _coefficients_of(self, req_id: str, request) -> tuple[SteeringSpec, np.ndarray] | None:
        """The request's spec and its coefficients; None when unsteered. The engine core admitted only requests whose
        prefix-cache key is the one their steering gives (admission.py); this worker checks it again under its own
        sets. Should that ever fail, the engine stops (RuntimeError): steering a request other than its key says would
        serve wrong KV to later requests, and leaving it unsteered would too."""
        extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
        try:
            spec = parse_steering(extra, self.options.limits)
            stamp = extra.get(CACHE_KEY) if isinstance(extra, dict) else None
            if spec is None and stamp is None:
                return None
            if spec is None or stamp is None or list(stamp) != cache_entry(self.options.sets, spec):
                raise SteeringError(f"its {CACHE_KEY!r} does not match its steering under this worker's sets",
                                    CACHE_KEY)
            return spec, self.options.sets.coefficients(spec).numpy()
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"emosteer: request {req_id} cannot be steered as the engine core admitted it: {exc}; "
                               "stopping rather than steering it otherwise") from exc

    def _admit(self, req_id: str, request, scheduled: set[str]) -> None:
        steering = self._coefficients_of(req_id, request)
        if steering is None:
            self.slot_of[req_id] = UNSTEERED
            return
        spec, coefficients = steering
        if not self.free_slots:  # slots of requests that are not in this batch are reclaimed
            self.forget([r for r in list(self.slot_of) if r not in scheduled])
        slot = self.free_slots.pop()
        self.slot_of[req_id] = slot
        self.coeff.np[slot] = coefficients
        self.start_of_slot[slot] = first_steered_position(spec.positions, request.num_prompt_tokens)
        self.coeff_dirty = True

    def update_set(self, name: str, bank: EmotionBank | None, source: str = "") -> str | None:
        """Load (or replace) a vector set into its block of the bank, in place; bank None unloads it. Runs between
        steps (a collective RPC); the front-end refuses it while requests that use the set are unfinished."""
        sets = self.options.sets
        if bank is None:
            self.device_vectors[:, sets.columns(sets.remove(name).block)].zero_()
            return None
        vector_set = sets.add(name, bank, source)
        sets.write(self.device_vectors, vector_set)
        return vector_set.digest

    # ---- per step ---------------------------------------------------------------------------------------
    def _upload_rows(self, n: int) -> None:
        if self.uploads is not None and n:
            self.uploads["rows"].copy_to_gpu(self.row_of_token.np[:n], out=self.row_of_token.gpu[:n])

    def _upload_coeff(self) -> None:
        if self.uploads is not None:
            self.uploads["coeff"].copy_to_gpu(self.coeff.np, out=self.coeff.gpu)

    def prepare(self, req_ids: list[str], requests, num_tokens_per_req: np.ndarray, num_computed: np.ndarray) -> None:
        """Fill row_of_token for this step's flattened batch: `req_ids` in batch-row order, each with its number of
        scheduled tokens and of tokens computed before this step; `requests[req_id]` has `sampling_params` and
        `num_prompt_tokens` (read once, when a request is first seen)."""
        total = int(num_tokens_per_req.sum())
        starts = np.cumsum(num_tokens_per_req) - num_tokens_per_req
        positions = np.arange(total) + np.repeat(num_computed - starts, num_tokens_per_req)  # of each batch token
        if self.capture is not None:
            self.capture.prepare(req_ids, requests, num_tokens_per_req, positions)
        if any(r not in self.slot_of for r in req_ids):
            scheduled = set(req_ids)
            admitted = [r for r in req_ids if r not in self.slot_of]
            for req_id in admitted:
                self._admit(req_id, requests[req_id], scheduled)
            if self.slot_offsets is not None:  # read by eager and compiled CPU forwards alike
                for slot in (self.slot_of[r] for r in admitted if self.slot_of[r] != UNSTEERED):
                    # one slot at a time: a batched matmul may sum in another order, and a request's offsets
                    # must not depend on which requests were admitted with it
                    self.slot_offsets[slot] = torch.bmm(self.coeff.gpu[slot].unsqueeze(1), self.device_vectors).squeeze(1)
        if self.coeff_dirty:
            self._upload_coeff()
            self.coeff_dirty = False
        slots = np.fromiter((self.slot_of[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        if self.options.mode == "naive":
            self._prepare_segments(slots, num_tokens_per_req, num_computed)
            return
        if (slots == UNSTEERED).all():
            if self.steered_upto:
                self.row_of_token.np[: self.steered_upto] = UNSTEERED
                self._upload_rows(self.steered_upto)
                self.steered_upto = 0
            self.plan = StepPlan(total) if self.host_plan else None
            return
        token_slot = np.repeat(slots, num_tokens_per_req)
        first_steered = np.where(token_slot >= 0, self.start_of_slot[token_slot], NEVER)
        rows = self.row_of_token.np[:total]
        rows[:] = np.where(positions >= first_steered, token_slot, UNSTEERED)
        stale = max(self.steered_upto, total)
        self.row_of_token.np[total:stale] = UNSTEERED
        self._upload_rows(stale)
        self.steered_upto = total
        if self.host_plan:
            self.plan = self._plan(rows, total)

    def _plan(self, rows: np.ndarray, total: int) -> StepPlan:
        """What this step steers, decided once on the host, so that eager forwards skip or simplify each layer."""
        steered = rows >= 0
        n = int(steered.sum())
        if n == 0:
            return StepPlan(total)
        if self.slot_offsets is None:  # the kernel (CUDA without graphs) or a very large CPU table: the general path
            return StepPlan(total, steered=n)
        index = None if n == total else torch.from_numpy(np.flatnonzero(steered))
        token_slots = rows[steered] if index is not None else rows
        first = int(token_slots[0])
        if (token_slots == first).all():  # one request's mix (a single client, or one spec)
            return StepPlan(total, n, index, slot=first)
        return StepPlan(total, n, index, token_slots=torch.from_numpy(token_slots.astype(np.int64)))

    def steer_eager(self, x: torch.Tensor, bank_row: int) -> None:
        """The op's work for an eager forward, using this step's host plan (the op's general path where there is
        none, where the kernel does it, or where x does not cover the step, e.g. a dummy run)."""
        plan = self.plan
        if plan is None or x.dim() != 2 or x.shape[0] < plan.total:
            steer_add_eager(x, self.row_of_token.gpu, self.coeff.gpu, self.device_vectors, bank_row)
            return
        if plan.steered == 0:
            return
        if plan.slot is not None:
            offset = self.offset_rows[plan.slot][bank_row]  # [H] fp32, a view: no indexing op per layer
        elif plan.token_slots is not None:
            # [n, H] fp32; index_select on the strided [slots, H] view costs a third of slot_offsets[slots, row]
            offset = torch.index_select(self.slot_offsets[:, bank_row], 0, plan.token_slots)
        else:
            steer_add_eager(x, self.row_of_token.gpu, self.coeff.gpu, self.device_vectors, bank_row)
            return
        if plan.index is None:  # the sum in fp32, rounded once into x's dtype (as the op)
            (x if x.shape[0] == plan.total else x[: plan.total]).add_(offset)
        else:
            x[plan.index] = (x[plan.index].float() + offset).to(x.dtype)

    # ---- the naive baseline (mode "naive"): what hook-based peers do --------------------------------------
    def _prepare_segments(self, slots, num_tokens_per_req, num_computed) -> None:
        ends = np.cumsum(num_tokens_per_req)
        starts = ends - num_tokens_per_req
        first = starts + np.clip(self.start_of_slot[np.maximum(slots, 0)] - num_computed, 0, None)
        keep = (slots >= 0) & (first < ends)
        self.segments = list(zip(first[keep].tolist(), ends[keep].tolist(), slots[keep].tolist()))

    def naive_add(self, x: torch.Tensor, bank_row: int) -> None:
        """A Python loop over the batch's steered requests, in every layer."""
        for start, end, slot in self.segments:
            x[start:end] += (self.coeff.gpu[slot, bank_row] @ self.device_vectors[bank_row]).to(x.dtype)
