"""Fused steering add: one launch per steered layer for the whole flattened batch.

Grid (T, cdiv(H, BLOCK_H)). Program (t, h) reads row[t]; for row -1 it returns before touching x (no load,
no store). Otherwise it loads the E coefficients of that row and layer, the E bank rows of the H block, sums
in fp32 and writes x once. T can be 0 (no launch) or anything up to the row buffer's length.
"""

import torch
import triton
import triton.language as tl


def block_config(H: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps) by hidden size. A fixed table, not autotune: autotuning benchmarks on first call,
    which must not happen inside CUDA-graph capture. Not yet measured on a GPU: `benchmarks/kernel.py --sweep`
    prints the sweep that should replace these defaults."""
    block = min(1024, triton.next_power_of_2(H))
    return block, (2 if block <= 256 else 4)


@triton.jit
def _steer_add_kernel(
    x_ptr, row_ptr, coeff_ptr, bank_ptr,
    layer, H, E,
    stride_xt, stride_ct, stride_cl, stride_bl, stride_be,
    BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
):
    t = tl.program_id(0)
    row = tl.load(row_ptr + t)
    if row < 0:
        return
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    c = tl.load(coeff_ptr + row.to(tl.int64) * stride_ct + layer * stride_cl + offs_e, mask=mask_e, other=0.0)
    b = tl.load(
        bank_ptr + layer * stride_bl + offs_e[:, None] * stride_be + offs_h[None, :],
        mask=mask_e[:, None] & mask_h[None, :], other=0.0,
    )
    offset = tl.sum(c[:, None].to(tl.float32) * b.to(tl.float32), axis=0)
    x_ptrs = x_ptr + t.to(tl.int64) * stride_xt + offs_h
    x = tl.load(x_ptrs, mask=mask_h)
    tl.store(x_ptrs, (x.to(tl.float32) + offset).to(x.dtype), mask=mask_h)


def steer_add_triton(x: torch.Tensor, row_of_token: torch.Tensor, coeff: torch.Tensor, bank: torch.Tensor,
                     layer: int, block_h: int | None = None, num_warps: int | None = None) -> None:
    T, H = x.shape
    if T == 0:
        return
    E = bank.shape[1]
    assert x.stride(1) == 1 and bank.stride(2) == 1 and coeff.stride(2) == 1, "hidden dims must be contiguous"
    assert row_of_token.shape[0] >= T, "row buffer shorter than the batch"
    args = (x, row_of_token, coeff, bank, layer, H, E,
            x.stride(0), coeff.stride(0), coeff.stride(1), bank.stride(0), bank.stride(1))
    default_block, default_warps = block_config(H)
    block_h = block_h or default_block
    _steer_add_kernel[(T, triton.cdiv(H, block_h))](
        *args, BLOCK_H=block_h, BLOCK_E=triton.next_power_of_2(E), num_warps=num_warps or default_warps
    )
