"""Fused steering add: one launch per steered layer for the whole flattened batch.

Grid (T, cdiv(H, BLOCK_H)). Program (t, h) reads row[t]; for row -1 it returns before touching x (no load,
no store). Otherwise it loads the E coefficients of that row and layer, the E bank rows of the H block, sums
in fp32 and writes x once. T can be 0 (no launch) or anything up to the row buffer's length.
"""

import torch
import triton
import triton.language as tl

# Chosen by measurement on an H200 would go here; until then a small autotune list keyed on H and E.
CONFIGS = [
    triton.Config({"BLOCK_H": 256}, num_warps=2),
    triton.Config({"BLOCK_H": 512}, num_warps=4),
    triton.Config({"BLOCK_H": 1024}, num_warps=4),
    triton.Config({"BLOCK_H": 2048}, num_warps=8),
]


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


_autotuned = triton.autotune(configs=CONFIGS, key=["H", "E"])(_steer_add_kernel)


def steer_add_triton(x: torch.Tensor, row_of_token: torch.Tensor, coeff: torch.Tensor, bank: torch.Tensor,
                     layer: int, block_h: int | None = None) -> None:
    T, H = x.shape
    if T == 0:
        return
    E = bank.shape[1]
    assert x.stride(1) == 1 and bank.stride(2) == 1 and coeff.stride(2) == 1, "hidden dims must be contiguous"
    assert row_of_token.shape[0] >= T, "row buffer shorter than the batch"
    args = (x, row_of_token, coeff, bank, layer, H, E,
            x.stride(0), coeff.stride(0), coeff.stride(1), bank.stride(0), bank.stride(1))
    block_e = max(triton.next_power_of_2(E), 1)
    if block_h is not None:
        _steer_add_kernel[(T, triton.cdiv(H, block_h))](*args, BLOCK_H=block_h, BLOCK_E=block_e)
    else:
        _autotuned[lambda meta: (T, triton.cdiv(H, meta["BLOCK_H"]))](*args, BLOCK_E=block_e)
