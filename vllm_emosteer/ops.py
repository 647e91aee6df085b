"""The steering add as a torch custom op: `torch.ops.emosteer.steer_add_`.

    x[t, :] += sum_e coeff[row[t], layer, e] * bank[layer, e, :]   for every t with row[t] >= 0

x is [T, H] (fp16, bf16 or fp32); row_of_token is int32 with at least T entries (-1 = leave untouched);
coeff is [slots, L, E] fp32; bank is [L, E, H] fp32. The sum is taken in fp32 and rounded once into x.
CPU: torch gather + matmul. CUDA: the fused Triton kernel. Fake: nothing (shapes do not change), for tracing.
The op is opaque to torch.compile and always runs, so compiled graphs and CUDA graphs never freeze a branch.
"""

import torch
from torch.library import Library

LIBRARY = Library("emosteer", "FRAGMENT")
LIBRARY.define("steer_add_(Tensor(a!) x, Tensor row_of_token, Tensor coeff, Tensor bank, int layer) -> ()")


def steer_add_torch(x: torch.Tensor, row_of_token: torch.Tensor, coeff: torch.Tensor, bank: torch.Tensor,
                    layer: int) -> None:
    rows = row_of_token[: x.shape[0]]
    steered = (rows >= 0).nonzero().squeeze(1)
    if steered.numel() == 0:
        return
    offset = coeff[rows[steered].long(), layer] @ bank[layer]  # [n, H] fp32
    x[steered] = (x[steered].float() + offset).to(x.dtype)


def steer_add_cuda(x, row_of_token, coeff, bank, layer) -> None:
    from vllm_emosteer.kernels.steer_add import steer_add_triton

    steer_add_triton(x, row_of_token, coeff, bank, layer)


def _steer_add_fake(x, row_of_token, coeff, bank, layer) -> None:
    return None


LIBRARY.impl("steer_add_", steer_add_torch, "CPU")
LIBRARY.impl("steer_add_", steer_add_cuda, "CUDA")
LIBRARY._register_fake("steer_add_", _steer_add_fake)
