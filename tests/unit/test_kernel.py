"""The fused Triton kernel under TRITON_INTERPRET=1 (no GPU here) against a float64 reference, and the custom
op inside torch.compile on CPU (its fake implementation used for tracing) against eager."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import vllm_emosteer.engine.worker.ops  # noqa: F401  registers torch.ops.emosteer.steer_add_
from vllm_emosteer.engine.worker.ops import steer_add_torch

INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    from vllm_emosteer.kernels.steer_add import steer_add_triton

    def reference(x, rows, coeff, bank, layer):
        out = x.double().clone()
        for t in range(x.shape[0]):
            if rows[t] >= 0:
                out[t] += coeff[rows[t], layer].double() @ bank[layer].double()
        return out

    g = torch.Generator().manual_seed(0)
    cases = [  # T, H, E, dtype, block_h, block_t (1: per-token kernel, > 1: token tiles)
        (0, 64, 5, torch.float32, 32, 1), (1, 64, 5, torch.float32, 32, 1), (7, 100, 5, torch.float16, 32, 1),
        (13, 96, 3, torch.bfloat16, 64, 1), (9, 130, 1, torch.float32, 64, 1), (16, 64, 8, torch.bfloat16, None, 1),
        (0, 64, 5, torch.float32, 32, 4), (1, 64, 5, torch.float32, 32, 4), (7, 100, 5, torch.float16, 32, 4),
        (13, 96, 3, torch.bfloat16, 64, 8), (9, 130, 1, torch.float32, 64, 2), (40, 64, 8, torch.bfloat16, 64, 16),
        (5, 64, 5, torch.float32, None, None),
    ]
    for T, H, E, dtype, block, block_t in cases:
        L, S = 3, 6
        for poison in (float("nan"), 7.0):
            wide = torch.randn(T, H + 11, generator=g).to(dtype)  # non-contiguous rows: stride H + 11
            x = wide[:, :H]
            rows = torch.randint(-1, S, (T + 5,), generator=g, dtype=torch.int32)
            if T:
                rows[0] = -1
            if T >= 24:  # a whole tile of -1 rows: the tile returns early
                rows[16:24] = -1
            coeff = torch.randn(S, L, E, generator=g)
            bank = torch.randn(L, E, H, generator=g)
            expected = reference(x, rows, coeff, bank, 1)
            before = x.clone()
            wide[:, H:] = poison  # anything outside x must stay as it is
            steer_add_triton(x, rows, coeff, bank, 1, block_h=block, block_t=block_t)
            assert torch.isnan(wide[:, H:]).all() if poison != poison else (wide[:, H:] == poison).all()
            tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
            steered = rows[:T] >= 0
            torch.testing.assert_close(x.double()[steered], expected[steered], rtol=tol, atol=tol)
            assert torch.equal(x[~steered], before[~steered])  # -1 rows untouched, bit for bit
    print("KERNEL-OK")
""")


def test_triton_kernel_in_interpreter():
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", INTERPRETER_CHECK], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, TRITON_INTERPRET="1"))
    assert "KERNEL-OK" in result.stdout, result.stderr[-3000:]


HARDWARE_ROUNDING_CHECK = textwrap.dedent("""
    import torch
    from vllm_emosteer.kernels.steer_add import steer_add_triton

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 96, generator=g) * 4).to(torch.bfloat16)
    rows = torch.zeros(64, dtype=torch.int32)
    coeff, bank = torch.ones(1, 1, 1), torch.randn(1, 1, 96, generator=g)  # one term: the fp32 sum is exact
    expected = (x.float() + bank[0, 0]).to(torch.bfloat16)  # torch rounds to nearest even, as GPUs do
    steer_add_triton(x, rows, coeff, bank, 0)
    print("ROUNDING-OK" if torch.equal(x, expected) else f"{(x != expected).sum().item()} elements differ")
""")


def test_the_test_harness_rounds_bfloat16_as_hardware_does():
    """tests/triton_cpu (the Model Runner V2 harness): Triton's interpreter alone truncates float32 to bfloat16; with
    the harness the kernel's bf16 result is the hardware's, bit for bit (the bf16 engine tests compare exactly)."""
    pytest.importorskip("triton")
    harness = str(Path(__file__).parents[1] / "triton_cpu")
    result = subprocess.run([sys.executable, "-c", HARDWARE_ROUNDING_CHECK], capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=harness))
    assert "ROUNDING-OK" in result.stdout, result.stdout[-500:] + result.stderr[-3000:]


def test_op_matches_float64_reference_on_cpu():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 48, generator=g, dtype=torch.float32)
    rows = torch.tensor([-1, 0, 2, -1, 1, 1, -1, 0, 2, -1, 5, 5], dtype=torch.int32)
    coeff, bank = torch.randn(3, 2, 4, generator=g), torch.randn(2, 4, 48, generator=g)
    expected = x.double().clone()
    for t in range(10):
        if rows[t] >= 0:
            expected[t] += coeff[rows[t], 1].double() @ bank[1].double()
    torch.ops.emosteer.steer_add_(x, rows, coeff, bank, 1)
    torch.testing.assert_close(x.double(), expected, rtol=1e-6, atol=1e-6)


def test_op_inside_torch_compile_equals_eager():
    class Block(torch.nn.Module):
        def __init__(self, rows, coeff, bank):
            super().__init__()
            self.linear = torch.nn.Linear(32, 32)
            self.rows, self.coeff, self.bank = rows, coeff, bank

        def forward(self, x):
            y = self.linear(x)
            torch.ops.emosteer.steer_add_(y, self.rows, self.coeff, self.bank, 0)
            return torch.relu(y) * 2

    g = torch.Generator().manual_seed(2)
    rows = torch.full((64,), -1, dtype=torch.int32)
    coeff, bank = torch.randn(4, 1, 3, generator=g), torch.randn(1, 3, 32, generator=g)
    block = Block(rows, coeff, bank)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    for step in range(3):  # buffers rewritten in place between calls, as the runner does
        rows.fill_(-1)
        rows[: 5 + step] = torch.tensor([0, 3, -1, 2, 1, 0, 1, 2][: 5 + step], dtype=torch.int32)
        coeff.mul_(1.5)
        x = torch.randn(9 + step, 32, generator=g)
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(block(x), torch.relu(block.linear(x)) * 2)


def test_torch_impl_is_the_cpu_dispatch():
    x = torch.zeros(2, 8)
    rows = torch.tensor([0, -1], dtype=torch.int32)
    coeff, bank = torch.ones(1, 1, 1), torch.ones(1, 1, 8)
    steer_add_torch(x, rows, coeff, bank, 0)
    assert x[0].sum() == 8 and x[1].sum() == 0


@pytest.mark.parametrize("shape", [(2, 5, 48), (48,), (1, 1, 1, 48)])
def test_op_refuses_inputs_that_are_not_the_flattened_batch(shape):
    """vLLM passes [T, H]; a 3-D [B, S, H] input would steer the wrong rows (rows index tokens), so it is refused
    by the op, by its fake (tracing) and by the eager path alike."""
    from vllm_emosteer.engine.worker.ops import steer_add_eager

    x = torch.zeros(shape)
    rows = torch.zeros(16, dtype=torch.int32)
    coeff, bank = torch.ones(1, 1, 2), torch.ones(1, 2, 48)
    for call in (torch.ops.emosteer.steer_add_, steer_add_torch, steer_add_eager):
        with pytest.raises(ValueError, match=r"x must be \[T, H\]"):
            call(x, rows, coeff, bank, 0)
    with pytest.raises(Exception, match=r"x must be \[T, H\]"):
        torch.compile(lambda t: torch.ops.emosteer.steer_add_(t, rows, coeff, bank, 0), fullgraph=True)(x)
    assert not x.any()


def test_triton_op_registration_and_trace():
    """Where Triton imports, the op is a `triton_op`: traced on CPU it becomes the opaque torch op (no nonzero in the
    graph); on CUDA it would become the Triton kernel itself (checked on the GPU by benchmarks/kernel.py)."""
    pytest.importorskip("triton")
    from torch._library.triton import get_triton_kernels_for_op

    import vllm_emosteer.engine.worker.ops as ops

    assert ops.TRITON_OP
    kernels = get_triton_kernels_for_op("emosteer::steer_add_")
    assert {k.fn.__name__ for k in kernels} >= {"_steer_add_token", "_steer_add_tile"}, kernels
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, inputs):
        graphs.append(gm.code)
        return gm.forward

    rows = torch.tensor([0, -1, 1], dtype=torch.int32)
    coeff, bank = torch.randn(2, 1, 3), torch.randn(1, 3, 16)

    def f(x):
        y = x * 2
        torch.ops.emosteer.steer_add_(y, rows, coeff, bank, 0)
        return y

    compiled = torch.compile(f, backend=aot_autograd(fw_compiler=capture), fullgraph=True, dynamic=True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(compiled(x), f(x))
    assert "emosteer.steer_add_torch_" in graphs[0] and "nonzero" not in graphs[0], graphs[0]


def test_block_table_covers_every_size():
    pytest.importorskip("triton")
    from vllm_emosteer.kernels.steer_add import block_config

    for H in (64, 576, 4096, 5000, 8192, 16384):
        for T in (None, 1, 7, 64, 256, 1024, 8192, 100000):
            block_t, block_h, warps = block_config(H, T)
            assert block_t >= 1 and block_h >= 16 and warps in (1, 2, 4, 8, 16)
            assert block_h <= max(16, 1 << (H - 1).bit_length())


def _slot_offsets(coeff, bank):
    """[slots, L, H]: each slot's offset at every bank row, as the runtime's host-plan table holds them."""
    return torch.stack([torch.bmm(coeff[s].unsqueeze(1), bank).squeeze(1) for s in range(coeff.shape[0])])


@pytest.mark.parametrize("table", [True, False], ids=["slot-offsets", "coeff-and-bank"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_form_equals_the_op(table, dtype):
    """The compiled CPU path's form (no nonzero): the steered tokens get the op's sum (rounded once), the others keep
    x bit for bit; the row buffer is longer than the batch and its tail is ignored."""
    from vllm_emosteer.engine.worker.ops import steer_add_masked

    g = torch.Generator().manual_seed(3)
    coeff, bank = torch.randn(6, 3, 5, generator=g), torch.randn(3, 5, 40, generator=g)
    rows = torch.tensor([-1, 0, 5, -1, 2, 2, -1, 1, 3, 4, 0, 0, 5, 5], dtype=torch.int32)  # T = 11, then stale
    x = (torch.randn(11, 40, generator=g) * 3).to(dtype)
    expected = x.clone()
    steer_add_torch(expected, rows, coeff, bank, 2)
    got = x.clone()
    steer_add_masked(got, rows, coeff, bank, 2, _slot_offsets(coeff, bank) if table else None)
    unsteered = rows[:11] < 0
    assert torch.equal(got[unsteered], x[unsteered])
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:  # the fp32 sums may differ in the last bit, so the rounding into bf16 may differ by one step
        torch.testing.assert_close(got.float(), expected.float(), rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("table", [True, False], ids=["slot-offsets", "coeff-and-bank"])
def test_compiled_cpu_hook_is_plain_torch_without_nonzero(table):
    """What a hook traces on CPU (hooks._steer under torch.compile): plain torch ops, neither nonzero nor the op,
    one graph for every T (no recompilation, no graph break), and the buffers read in place at every call, as the
    runner rewrites rows, coefficients, the bank (a set loaded after compilation) and the per-slot table."""
    from vllm_emosteer.engine.worker import hooks

    g = torch.Generator().manual_seed(4)
    S, L, E, H = 8, 2, 3, 32
    coeff, bank = torch.zeros(S, L, E), torch.zeros(L, E, H)
    runtime = SimpleNamespace(options=SimpleNamespace(mode="fused"), row_of_token=SimpleNamespace(gpu=torch.full(
        (512,), -1, dtype=torch.int32)), coeff=SimpleNamespace(gpu=coeff), device_vectors=bank,
        slot_offsets=torch.zeros(S, L, H) if table else None)
    linear = torch.nn.Linear(H, H)

    def block(x):
        y = linear(x)
        hooks._steer(y, runtime, 1)
        return torch.relu(y) * 2

    graphs = []

    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graphs.append(gm.code)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(block, backend=backend, fullgraph=True)
    for step, T in enumerate((5, 64, 300, 7)):
        rows = runtime.row_of_token.gpu
        rows.fill_(-1)
        rows[:T] = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32)
        rows[T: T + 9] = 0  # stale rows beyond the batch: ignored
        coeff.copy_(torch.randn(S, L, E, generator=g))
        bank.copy_(torch.randn(L, E, H, generator=g) * (step + 1))  # new vectors after compilation
        if table:
            runtime.slot_offsets.copy_(_slot_offsets(coeff, bank))
        x = torch.randn(T, H, generator=g)
        torch._dynamo.mark_dynamic(x, 0)
        with torch.no_grad():
            expected = linear(x)
            steer_add_torch(expected, rows, coeff, bank, 1)
            expected = torch.relu(expected) * 2
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1, f"{len(graphs)} graphs: recompiled"
    assert "nonzero" not in graphs[0] and "emosteer" not in graphs[0], graphs[0]
