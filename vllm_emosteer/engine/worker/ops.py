"""The steering add as a torch custom op, `torch.ops.emosteer.steer_add_`, and its traced CPU form.

    x[t, :] += sum_e coeff[row[t], layer, e] * bank[layer, e, :]   for every t with row[t] >= 0

x is [T, H] (fp16, bf16 or fp32; any other rank is refused: vLLM always passes the flattened batch, and a 3-D
input would steer the wrong rows); row_of_token is int32 with at least T entries (-1 = leave untouched); coeff is
[slots, L, E] fp32; bank is [L, E, H] fp32. The sum is taken in fp32 and rounded once into x.

Registration:
* Where Triton imports, `steer_add_` is a `torch.library.triton_op`: on CUDA it launches the fused Triton kernel
  through `wrap_triton`, so torch.compile (Inductor) sees the kernel itself rather than an opaque call; on any
  other device it calls `steer_add_torch_`.
* Eager forwards call `steer_add_eager` (no dispatcher): the kernel wherever it runs (`kernel_runs_on`: CUDA, or
  any device under Triton's interpreter, which is how the kernel's path inside vLLM is tested on CPU).
* `steer_add_torch_` is an opaque op (torch gather + matmul, a fake that does nothing), so that no trace sees its
  data-dependent `nonzero`.
* Without Triton (or with VLLM_EMOSTEER_OPAQUE_OP=1), `steer_add_` is an opaque op as well (CPU: torch;
  CUDA: the kernel launched from Python, if Triton imports at all).

What the hooks run while torch.compile traces: on CUDA the op; on any other device `steer_add_masked`, plain torch
ops with neither `nonzero` nor a branch (every token's offset is gathered, and a mask keeps the unsteered tokens),
which Inductor fuses into one loop over x. Either way the add always runs, so compiled graphs and CUDA graphs
never freeze a branch.
"""

from __future__ import annotations

import os

import torch
from torch.library import Library

SCHEMA = "(Tensor(a!) x, Tensor row_of_token, Tensor coeff, Tensor bank, int layer) -> ()"
LIBRARY = Library("emosteer", "FRAGMENT")
# Triton's interpreter (TRITON_INTERPRET=1) runs the kernel on CPU tensors: how the kernel's path inside vLLM is
# tested on a machine without a GPU (Model Runner V2 needs the same interpreter there).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def check_shapes(x: torch.Tensor, row_of_token: torch.Tensor, coeff: torch.Tensor, bank: torch.Tensor) -> None:
    """Refuse inputs that would steer the wrong elements (works on fake tensors: shapes only)."""
    if x.dim() != 2:
        raise ValueError(f"emosteer.steer_add_: x must be [T, H] (the flattened batch), got shape {tuple(x.shape)}")
    if bank.dim() != 3 or coeff.dim() != 3 or row_of_token.dim() != 1:
        raise ValueError(
            "emosteer.steer_add_: expected row_of_token [T_max], coeff [slots, L, E] and bank [L, E, H], got "
            f"{tuple(row_of_token.shape)}, {tuple(coeff.shape)} and {tuple(bank.shape)}"
        )
    if bank.shape[2] != x.shape[1] or coeff.shape[2] != bank.shape[1]:
        raise ValueError(
            f"emosteer.steer_add_: x {tuple(x.shape)}, coeff {tuple(coeff.shape)} and bank {tuple(bank.shape)} "
            "do not fit together"
        )


def steer_add_torch(x: torch.Tensor, row_of_token: torch.Tensor, coeff: torch.Tensor, bank: torch.Tensor,
                    layer: int) -> None:
    check_shapes(x, row_of_token, coeff, bank)
    rows = row_of_token[: x.shape[0]]
    steered = (rows >= 0).nonzero().squeeze(1)
    if steered.numel() == 0:
        return
    offset = coeff[rows[steered].long(), layer] @ bank[layer]  # [n, H] fp32
    x[steered] = (x[steered].float() + offset).to(x.dtype)


def steer_add_masked(x: torch.Tensor, row_of_token: torch.Tensor, coeff: torch.Tensor, bank: torch.Tensor,
                     layer: int, slot_offsets: torch.Tensor | None = None) -> None:
    """The op's work as plain torch ops for torch.compile to trace (the compiled CPU path): no `nonzero`, no
    data-dependent branch, no dynamic size but T. Every token's offset is gathered by its row clamped to a valid
    slot, and `torch.where` on `row >= 0` keeps the unsteered tokens' x bit for bit; the sum is in fp32, rounded
    once into x. Inductor fuses it into one loop over [T, H] (and into x's neighbours).

    `slot_offsets` ([slots, L, H] fp32: each slot's offset at every bank row, the runtime's host-plan table)
    makes the offset a gather of one row; without it, the offset is summed over E from coeff and bank (unrolled
    by Inductor up to 8 columns; a matmul here is slower on CPU, and the sum's cost grows with E)."""
    check_shapes(x, row_of_token, coeff, bank)
    if slot_offsets is not None and tuple(slot_offsets.shape) != (coeff.shape[0], bank.shape[0], bank.shape[2]):
        raise ValueError(f"emosteer: slot_offsets {tuple(slot_offsets.shape)} does not fit coeff "
                         f"{tuple(coeff.shape)} and bank {tuple(bank.shape)}")
    rows = row_of_token[: x.shape[0]]  # the buffer is longer than the batch
    slots = rows.clamp(0, coeff.shape[0] - 1).long()  # the upper bound spares Inductor an index check
    if slot_offsets is not None:
        offset = slot_offsets[slots, layer]  # [T, H] fp32
    else:
        offset = (coeff[slots, layer].unsqueeze(2) * bank[layer]).sum(1)  # [T, H] fp32
    x.copy_(torch.where((rows >= 0).unsqueeze(1), (x.float() + offset).to(x.dtype), x))


def steer_add_eager(x: torch.Tensor, row_of_token: torch.Tensor, coeff: torch.Tensor, bank: torch.Tensor,
                    layer: int) -> None:
    """The op's work without the dispatcher (eager forwards only, never while torch.compile traces): where the kernel
    runs it is launched directly, anything else runs the torch implementation."""
    if kernel_runs_on(x.device):
        check_shapes(x, row_of_token, coeff, bank)
        if x.shape[0]:
            launch(x, row_of_token, coeff, bank, layer, block_config(x.shape[1], x.shape[0]))
    elif x.device.type == "cuda":
        torch.ops.emosteer.steer_add_(x, row_of_token, coeff, bank, layer)
    else:
        steer_add_torch(x, row_of_token, coeff, bank, layer)


def _fake(x, row_of_token, coeff, bank, layer) -> None:
    check_shapes(x, row_of_token, coeff, bank)
    return None


def _triton_available() -> bool:
    if os.environ.get("VLLM_EMOSTEER_OPAQUE_OP") == "1":
        return False
    try:
        import triton  # noqa: F401
        from torch.library import triton_op, wrap_triton  # noqa: F401

        from vllm_emosteer.kernels import steer_add  # noqa: F401
    except Exception:  # no Triton, or one that does not load here
        return False
    return True


def kernel_runs_on(device: torch.device) -> bool:
    """Whether the op is the Triton kernel on this device: on CUDA, and on any device under Triton's interpreter."""
    return TRITON_OP and (device.type == "cuda" or INTERPRETED)


LIBRARY.define("steer_add_torch_" + SCHEMA)
LIBRARY.impl("steer_add_torch_", steer_add_torch, "CPU")
LIBRARY.impl("steer_add_torch_", steer_add_torch, "CUDA")  # only reached without Triton, or by choice
LIBRARY._register_fake("steer_add_torch_", _fake)

TRITON_OP = _triton_available()

if TRITON_OP:
    from torch.library import triton_op, wrap_triton

    from vllm_emosteer.kernels.steer_add import _steer_add_tile, _steer_add_token, block_config, kernel_call, launch

    @triton_op("emosteer::steer_add_", mutates_args={"x"})
    def steer_add_(x: torch.Tensor, row_of_token: torch.Tensor, coeff: torch.Tensor, bank: torch.Tensor,
                   layer: int) -> None:
        check_shapes(x, row_of_token, coeff, bank)
        if x.device.type != "cuda":  # traced, the interpreter's kernel cannot run on fake tensors
            torch.ops.emosteer.steer_add_torch_(x, row_of_token, coeff, bank, layer)
            return
        T, H = x.shape
        if isinstance(T, int) and T == 0:
            return
        # T is symbolic while torch.compile traces a dynamic batch: then the config is fixed for all T
        config = block_config(H, T if isinstance(T, int) else None)
        kernel, grid, args, meta = kernel_call(x, row_of_token, coeff, bank, layer, config)
        if kernel is _steer_add_token:  # spelled out, so that torch finds the kernels of the op
            wrap_triton(_steer_add_token)[grid](*args, **meta)
        else:
            wrap_triton(_steer_add_tile)[grid](*args, **meta)

else:
    def _steer_add_cuda(x, row_of_token, coeff, bank, layer) -> None:
        check_shapes(x, row_of_token, coeff, bank)
        try:
            from vllm_emosteer.kernels.steer_add import steer_add_triton
        except ImportError:
            steer_add_torch(x, row_of_token, coeff, bank, layer)
            return
        steer_add_triton(x, row_of_token, coeff, bank, layer)

    LIBRARY.define("steer_add_" + SCHEMA)
    LIBRARY.impl("steer_add_", steer_add_torch, "CPU")
    LIBRARY.impl("steer_add_", _steer_add_cuda, "CUDA")
    LIBRARY._register_fake("steer_add_", _fake)
