"""The steering add as a torch custom op: `torch.ops.emosteer.steer_add_`.

    x[t, :] += sum_e coeff[row[t], layer, e] * bank[layer, e, :]   for every t with row[t] >= 0

x is [T, H] (fp16, bf16 or fp32; any other rank is refused: vLLM always passes the flattened batch, and a 3-D
input would steer the wrong rows); row_of_token is int32 with at least T entries (-1 = leave untouched); coeff is
[slots, L, E] fp32; bank is [L, E, H] fp32. The sum is taken in fp32 and rounded once into x.

Registration:
* Where Triton imports, `steer_add_` is a `torch.library.triton_op`: on CUDA it launches the fused Triton kernel
  through `wrap_triton`, so torch.compile (Inductor) sees the kernel itself rather than an opaque call; on any
  other device it calls `steer_add_torch_`.
* `steer_add_torch_` is an opaque op (torch gather + matmul, a fake that does nothing): the CPU path, opaque so
  that tracing never sees its data-dependent `nonzero`.
* Without Triton (or with VLLM_EMOSTEER_OPAQUE_OP=1), `steer_add_` is an opaque op as well (CPU: torch;
  CUDA: the kernel launched from Python, if Triton imports at all).
The op always runs, so compiled graphs and CUDA graphs never freeze a branch.
"""

from __future__ import annotations

import os

import torch
from torch.library import Library

SCHEMA = "(Tensor(a!) x, Tensor row_of_token, Tensor coeff, Tensor bank, int layer) -> ()"
LIBRARY = Library("emosteer", "FRAGMENT")


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


def steer_add_eager(x: torch.Tensor, row_of_token: torch.Tensor, coeff: torch.Tensor, bank: torch.Tensor,
                    layer: int) -> None:
    """The op's work without the dispatcher (eager forwards only, never while torch.compile traces): CUDA launches
    the kernel directly, anything else runs the torch implementation."""
    if x.device.type == "cuda" and TRITON_OP:
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
        if x.device.type != "cuda":
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
