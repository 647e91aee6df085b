"""Fused steering add: one launch per steered layer for the whole flattened batch.

    x[t, :] += sum_e coeff[row[t], layer, e] * bank[layer, e, :]   for every t < T with row[t] >= 0

Two kernels, one launch each:
* per token (BLOCK_T = 1): grid (T, cdiv(H, BLOCK_H)). A program whose row is -1 returns before touching x.
* token tile (BLOCK_T > 1): grid (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H)). The E bank rows of an H block are loaded
  once per tile instead of once per token (the bank is fp32: E * 4 bytes per element against 2 * 2 for a bf16 x,
  so at large T the per-token kernel moves more bank bytes through L2 than x bytes through DRAM). A tile with no
  steered token returns before touching x; loads and stores of -1 rows are masked off (no load, no store).

Both sum in fp32 and round once into x; T can be 0 (no launch) or anything up to the row buffer's length.
`kernel_call()` names the kernel, grid and arguments, so that the custom op can launch it through
`torch.library.wrap_triton` and `launch()` directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_T, BLOCK_H, num_warps) by (H, T). A fixed table, not autotune: autotuning benchmarks on the first call,
# which must not happen inside CUDA-graph capture. T is static inside each captured CUDA graph, so choosing by T
# is graph-safe. Rows: (largest H, largest T, config); the first row that fits wins.
# Measured: `benchmarks/kernel.py --sweep` on an H100 80GB HBM3, 2026-11-26 (bf16, E = 5, per add inside a CUDA
# graph); docs/performance.md has the numbers. Token tiles (BLOCK_T 8-16) win from T = 64 up: each tile loads the fp32 bank
# block once instead of once per token.
BIG = 1 << 62
BLOCK_TABLE: tuple[tuple[int, int, tuple[int, int, int]], ...] = (
    (4096, 1, (1, 2048, 1)),
    (4096, 16, (1, 128, 1)),
    (4096, 256, (8, 128, 1)),
    (4096, BIG, (16, 256, 1)),
    (BIG, 1, (1, 4096, 2)),
    (BIG, 64, (8, 128, 1)),
    (BIG, 256, (16, 256, 1)),
    (BIG, 1024, (8, 128, 1)),
    (BIG, BIG, (16, 256, 1)),
)
# When T is not known (a symbolic size while torch.compile traces the op, e.g. vLLM's dynamic-batch graph): the
# config within 12% of the best at every swept T >= 16 for H 4096 and 8192 (T = 1 was swept for BLOCK_T = 1 only).
SYMBOLIC_T: tuple[tuple[int, tuple[int, int, int]], ...] = ((BIG, (8, 128, 1)),)


def block_config(H: int, T: int | None) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, num_warps) for hidden size H and T tokens (None: not known at trace time)."""
    if T is None:
        config = next(c for h, c in SYMBOLIC_T if H <= h)
    else:
        config = next(c for h, t, c in BLOCK_TABLE if H <= h and T <= t)
    block_t, block_h, warps = config
    return block_t, min(block_h, triton.next_power_of_2(H)), warps


@triton.jit
def _steer_add_token(
    x_ptr, row_ptr, coeff_ptr, bank_ptr,
    layer, H,
    stride_xt, stride_ct, stride_cl, stride_bl, stride_be,
    BLOCK_H: tl.constexpr, E: tl.constexpr, BLOCK_E: tl.constexpr,
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


@triton.jit
def _steer_add_tile(
    x_ptr, row_ptr, coeff_ptr, bank_ptr,
    T, layer, H,
    stride_xt, stride_ct, stride_cl, stride_bl, stride_be,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, E: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tl.load(row_ptr + offs_t, mask=offs_t < T, other=-1)
    if tl.max(rows, axis=0) < 0:
        return
    steered = rows >= 0
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    coeff_rows = coeff_ptr + rows.to(tl.int64) * stride_ct + layer * stride_cl
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for e in tl.static_range(E):
        c = tl.load(coeff_rows + e, mask=steered, other=0.0).to(tl.float32)
        b = tl.load(bank_ptr + layer * stride_bl + e * stride_be + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        acc += c[:, None] * b[None, :]
    mask = steered[:, None] & mask_h[None, :]
    x_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_h[None, :]
    x = tl.load(x_ptrs, mask=mask)
    tl.store(x_ptrs, (x.to(tl.float32) + acc).to(x.dtype), mask=mask)


def kernel_call(x: torch.Tensor, row_of_token: torch.Tensor, coeff: torch.Tensor, bank: torch.Tensor, layer: int,
                config: tuple[int, int, int]):
    """(kernel, grid, args, meta) of the kernel that `config` = (BLOCK_T, BLOCK_H, num_warps) names. Shapes are
    checked by the caller; T may be symbolic (torch.compile tracing through `torch.library.wrap_triton`)."""
    T, H = x.shape
    E = bank.shape[1]
    block_t, block_h, warps = config
    strides = (x.stride(0), coeff.stride(0), coeff.stride(1), bank.stride(0), bank.stride(1))
    if block_t == 1:
        return (_steer_add_token, (T, triton.cdiv(H, block_h)), (x, row_of_token, coeff, bank, layer, H, *strides),
                dict(BLOCK_H=block_h, E=E, BLOCK_E=triton.next_power_of_2(E), num_warps=warps))
    return (_steer_add_tile, (triton.cdiv(T, block_t), triton.cdiv(H, block_h)),
            (x, row_of_token, coeff, bank, T, layer, H, *strides),
            dict(BLOCK_T=block_t, BLOCK_H=block_h, E=E, num_warps=warps))


def launch(x, row_of_token, coeff, bank, layer: int, config: tuple[int, int, int]) -> None:
    kernel, grid, args, meta = kernel_call(x, row_of_token, coeff, bank, layer, config)
    kernel[grid](*args, **meta)


def steer_add_triton(x: torch.Tensor, row_of_token: torch.Tensor, coeff: torch.Tensor, bank: torch.Tensor,
                     layer: int, block_h: int | None = None, num_warps: int | None = None,
                     block_t: int | None = None) -> None:
    """Direct launch (no custom op): for the benchmark's sweep and the interpreter tests. None: the table's."""
    T, H = x.shape
    if T == 0:
        return
    assert x.stride(1) == 1 and bank.stride(2) == 1 and coeff.stride(2) == 1, "hidden dims must be contiguous"
    assert row_of_token.shape[0] >= T, "row buffer shorter than the batch"
    default = block_config(H, T)
    config = (block_t or default[0], block_h or default[1], num_warps or default[2])
    launch(x, row_of_token, coeff, bank, layer, config)
