"""GPU check and microbenchmark of the fused steering kernel (one prepared run: checks first, then timings).

Runs where there is a CUDA GPU, PyTorch, Triton and transformers; vLLM is not needed (the kernel, the custom op
and the hooks import without it).

Checks:  kernel vs float64 reference (fp16/bf16/fp32, T in {0, 1, 7, 300}, H not a multiple of the block,
         -1 rows, non-contiguous rows, poisoned padding); CUDA-graph capture and replay with the row and
         coefficient buffers rewritten between replays; a transformers Llama with Llama-8B widths (H=4096,
         4 layers, random weights) steered through the plugin's hooks and op: eager logits == CUDA-graph replay
         logits, and a mixed batch (each sequence its own mix) == each sequence run alone.
Timings (CUDA events, median): for T in {1, 64, 256, 1024, 8192} and H in {4096, 8192}, bf16, 5 emotions:
         floor (x read + written once over the copy bandwidth measured here), a per-request Python loop
         (hook-based peers), torch gather + matmul (the CPU implementation), the fused kernel eager, and the
         fused kernel inside one CUDA graph of 32 adds (per add); then the model-level decode step
         (batch 256, every sequence its own mix) steered / unsteered, in CUDA graphs.

    python benchmarks/kernel.py [--quick] [--sweep] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

import torch

from vllm_emosteer.hooks import install_hooks
from vllm_emosteer.kernels.steer_add import steer_add_triton
from vllm_emosteer.ops import steer_add_torch

E, L_BANK = 5, 32


def reference(x, rows, coeff, bank, layer):
    out = x.double().clone()
    steered = rows[: x.shape[0]] >= 0
    idx = steered.nonzero().squeeze(1)
    out[idx] += coeff[rows[idx].long(), layer].double() @ bank[layer].double()
    return out


def check_kernel():
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        for T in (0, 1, 7, 300):
            for H in (100, 4096, 5000):
                wide = torch.randn(T, H + 8, device="cuda", generator=g).to(dtype)
                x = wide[:, :H]
                rows = torch.randint(-1, 6, (T + 3,), device="cuda", generator=g, dtype=torch.int32)
                coeff = torch.randn(6, 3, E, device="cuda", generator=g)
                bank = torch.randn(3, E, H, device="cuda", generator=g)
                wide[:, H:] = float("nan")
                expected, before = reference(x, rows, coeff, bank, 2), x.clone()
                torch.ops.emosteer.steer_add_(x, rows, coeff, bank, 2)
                steered = rows[:T] >= 0
                assert torch.isnan(wide[:, H:]).all(), "wrote outside x"
                torch.testing.assert_close(x.double()[steered], expected[steered], rtol=tol, atol=tol)
                assert torch.equal(x[~steered], before[~steered]), "-1 rows changed"
    return "kernel == float64 reference (3 dtypes, T 0/1/7/300, H 100/4096/5000, -1 rows, strided rows)"


def check_graph_replay():
    T, H = 256, 4096
    x_static = torch.zeros(T, H, device="cuda", dtype=torch.bfloat16)
    rows = torch.full((T,), -1, device="cuda", dtype=torch.int32)
    coeff = torch.zeros(T, 1, E, device="cuda")
    bank = torch.randn(1, E, H, device="cuda")
    source = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    steer_add_triton(x_static, rows, coeff, bank, 0)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x_static.copy_(source)
        torch.ops.emosteer.steer_add_(x_static, rows, coeff, bank, 0)
    for step in range(4):  # new rows and coefficients each replay, written in place as the runner does
        rows.copy_(torch.randint(-1, T, (T,), device="cuda", dtype=torch.int32))
        coeff.copy_(torch.randn(T, 1, E, device="cuda") * (step + 1))
        graph.replay()
        expected = reference(source, rows, coeff, bank, 0)
        torch.testing.assert_close(x_static.double(), expected, rtol=1.6e-2, atol=1.6e-2)
    return "CUDA graph replay follows rewritten row/coefficient buffers (4 replays)"


def llama_8b_width(layers=4, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to("cuda", dtype).eval()


def steering_state(model, max_tokens, slots):
    H, L = model.config.hidden_size, model.config.num_hidden_layers
    state = SimpleNamespace(
        options=SimpleNamespace(mode="fused"),
        rows=SimpleNamespace(gpu=torch.full((max_tokens,), -1, device="cuda", dtype=torch.int32)),
        coeff=SimpleNamespace(gpu=torch.zeros(slots, L, E, device="cuda")),
        bank=torch.randn(L, E, H, device="cuda") * 0.5,
    )
    state.handles = install_hooks(model, state, "attn_out", {i: i for i in range(L)})
    return state


@torch.no_grad()
def check_model():
    model = llama_8b_width()
    B, S = 8, 16
    state = steering_state(model, B * S, B)
    ids = torch.randint(0, 32000, (B, S), device="cuda")
    state.coeff.gpu.copy_(torch.randn(B, model.config.num_hidden_layers, E, device="cuda"))
    state.rows.gpu.copy_(torch.arange(B, device="cuda", dtype=torch.int32).repeat_interleave(S))
    eager = model(input_ids=ids, use_cache=False).logits
    alone = []
    for b in range(B):  # each sequence alone, with its own slot
        state.rows.gpu.fill_(-1)
        state.rows.gpu[:S] = b
        alone.append(model(input_ids=ids[b : b + 1], use_cache=False).logits)
    torch.testing.assert_close(eager, torch.cat(alone), rtol=2e-2, atol=2e-2)
    state.rows.gpu.copy_(torch.arange(B, device="cuda", dtype=torch.int32).repeat_interleave(S))
    static_ids = ids.clone()
    for _ in range(2):
        model(input_ids=static_ids, use_cache=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(input_ids=static_ids, use_cache=False).logits
    graph.replay()
    torch.testing.assert_close(static_out, eager, rtol=0, atol=0)
    for h in state.handles:
        h.remove()
    return "Llama-8B widths (4 layers): mixed batch == per-sequence runs; eager logits == CUDA-graph logits"


def time_cuda(fn, iters=200, warmup=20):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]  # us


def graphed(fn, adds=32):
    """Per-call time of `fn` inside one CUDA graph of `adds` calls (launch cost amortized)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(adds):
            fn()
    return time_cuda(graph.replay, iters=100) / adds


def copy_bandwidth():
    a = torch.empty(1 << 28, device="cuda", dtype=torch.uint8)
    b = torch.empty_like(a)
    us = time_cuda(lambda: b.copy_(a), iters=50)
    return 2 * a.numel() / (us * 1e-6) / 1e9  # GB/s, read + write


def bench_kernel(T, H, bandwidth, quick):
    requests = T if T <= 1024 else 256
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    rows = (torch.arange(T, device="cuda") * requests // T).to(torch.int32)
    coeff = torch.randn(requests, L_BANK, E, device="cuda")
    bank = torch.randn(L_BANK, E, H, device="cuda")
    floor = 2 * T * H * 2 / (bandwidth * 1e9) * 1e6
    per_request = [(int(s), int(e), int(r)) for r, (s, e) in enumerate(
        zip(torch.searchsorted(rows, torch.arange(requests, device="cuda", dtype=torch.int32)).tolist(),
            torch.searchsorted(rows, torch.arange(1, requests + 1, device="cuda", dtype=torch.int32)).tolist()))]

    def loop():
        for s, e, r in per_request:
            x[s:e] += (coeff[r, 3] @ bank[3]).to(x.dtype)

    result = {"T": T, "H": H, "requests": requests, "floor_us": floor}
    result["loop_us"] = time_cuda(loop, iters=5 if quick or requests > 256 else 20, warmup=2)
    result["torch_us"] = time_cuda(lambda: steer_add_torch(x, rows, coeff, bank, 3))
    result["fused_us"] = time_cuda(lambda: steer_add_triton(x, rows, coeff, bank, 3))
    result["fused_graphed_us"] = graphed(lambda: steer_add_triton(x, rows, coeff, bank, 3))
    result["fused_graphed_over_floor"] = result["fused_graphed_us"] / floor
    result["torch_over_fused_eager"] = result["torch_us"] / result["fused_us"]
    return result


def sweep_blocks(T, H):
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    rows = torch.arange(T, device="cuda", dtype=torch.int32) % 256
    coeff, bank = torch.randn(256, L_BANK, E, device="cuda"), torch.randn(L_BANK, E, H, device="cuda")
    out = {}
    for block in (128, 256, 512, 1024, 2048, 4096):
        for warps in (1, 2, 4, 8):
            if block <= H * 2:
                out[f"{block}/{warps}"] = graphed(lambda: steer_add_triton(x, rows, coeff, bank, 3, block, warps))
    return out


@torch.no_grad()
def bench_model(layers=4, batch=256):
    """Decode-like step: 256 sequences, one token each (no KV cache), every sequence its own mix."""
    model = llama_8b_width(layers)
    ids = torch.randint(0, 32000, (batch, 1), device="cuda")
    times = {}
    for steered in (False, True):
        state = steering_state(model, batch, batch) if steered else None
        if steered:
            state.coeff.gpu.copy_(torch.randn(batch, layers, E, device="cuda"))
            state.rows.gpu.copy_(torch.arange(batch, device="cuda", dtype=torch.int32))
        for _ in range(3):
            model(input_ids=ids, use_cache=False)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(input_ids=ids, use_cache=False)
        times["steered" if steered else "unsteered"] = time_cuda(graph.replay, iters=100)
        if steered:
            for h in state.handles:
                h.remove()
    times["ratio"] = times["steered"] / times["unsteered"]
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also sweep BLOCK_H x num_warps at T=256 and 8192")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernel.py needs a CUDA GPU", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["checks"] = []
    for check in (check_kernel, check_graph_replay, check_model):
        try:
            report["checks"].append("OK " + check())
        except Exception as exc:  # report and go on to the timings: one run must give everything
            report["checks"].append(f"FAIL {check.__name__}: {type(exc).__name__}: {exc}")
        print(report["checks"][-1])
    bandwidth = copy_bandwidth()
    report["copy_bandwidth_GBps"] = bandwidth
    rows = []
    print(f"\n{report['device']}, copy bandwidth {bandwidth:.0f} GB/s, bf16, E={E}")
    print("| T | H | requests | floor us | per-request loop us | torch us | fused us | fused graphed us/add | "
          "graphed / floor | torch / fused (eager) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for H in (4096, 8192):
        for T in (1, 64, 256, 1024, 8192):
            r = bench_kernel(T, H, bandwidth, args.quick)
            rows.append(r)
            print(f"| {T} | {H} | {r['requests']} | {r['floor_us']:.1f} | {r['loop_us']:.0f} | {r['torch_us']:.1f} | "
                  f"{r['fused_us']:.1f} | {r['fused_graphed_us']:.2f} | {r['fused_graphed_over_floor']:.2f} | "
                  f"{r['torch_over_fused_eager']:.1f} |")
    report["kernel"] = rows
    if args.sweep:
        report["sweep"] = {f"T{T}": sweep_blocks(T, 4096) for T in (256, 8192)}
        print(json.dumps(report["sweep"], indent=1))
    report["model"] = bench_model()
    print(f"\nmodel-level decode step (Llama-8B widths, 4 layers, batch 256, distinct mixes, CUDA graphs): "
          f"unsteered {report['model']['unsteered']:.0f} us, steered {report['model']['steered']:.0f} us, "
          f"ratio {report['model']['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
