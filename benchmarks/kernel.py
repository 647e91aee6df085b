"""GPU check and microbenchmark of the fused steering kernel (one prepared run: checks first, then timings).

Runs where there is a CUDA GPU, PyTorch, Triton and transformers; vLLM is not needed (the kernel, the custom op
and the hooks import without it; run from a checkout, the package need not be installed).

Checks:  the op (a `triton_op`) and each kernel variant vs a float64 reference (fp16/bf16/fp32, T in
         {0, 1, 7, 300}, H not a multiple of the block, -1 rows, strided rows, poisoned padding); CUDA-graph
         capture and replay with the row and coefficient buffers rewritten between replays; the op inside
         torch.compile (Inductor, dynamic T) vs the reference; a transformers Llama with Llama-8B widths (H=4096,
         random weights, fp32) steered through the plugin's eager path in hooks that flatten [B, S, H] to [T, H]:
         mixed batch == each sequence alone (tolerance 1e-3: fp32, batched GEMMs differ from single ones), CUDA-graph
         replay == eager (tolerance 1e-3: cuBLAS picks other kernels under capture), steering changes the logits.
Timings (CUDA events, median): for T in {1, 64, 256, 1024, 8192} and H in {4096, 8192}, bf16, 5 emotions:
         floor (x read + written once over the copy bandwidth measured here), a per-request Python loop
         (hook-based peers), torch gather + matmul (the CPU implementation), the op eager, the direct launch
         eager, and the kernel inside one CUDA graph of 32 adds (per add); eager launch cost of each way in;
         then the model-level decode step (batch 256, every sequence its own mix) steered / unsteered, CUDA graphs.
--sweep: (BLOCK_T, BLOCK_H, num_warps) per (H, T), graphed, printed as the block table to paste into
         kernels/steer_add.py (BLOCK_TABLE and SYMBOLIC_T).
--smoke: the same path on CPU in seconds (tiny sizes, the torch op, no CUDA graphs; with TRITON_INTERPRET=1 the
         Triton kernels and the sweep run in Triton's interpreter). CI runs it, so shape errors show there.

    python benchmarks/kernel.py [--smoke] [--quick] [--sweep] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: the package need not be installed
    sys.path.insert(0, str(ROOT))
import vllm_emosteer  # noqa: E402

try:
    import vllm_emosteer.kernels  # noqa: F401  installed: kernels/ is vllm_emosteer.kernels (setup.py)
except ImportError:  # a checkout: let kernels/ resolve as vllm_emosteer.kernels
    vllm_emosteer.__path__.append(str(ROOT))

from vllm_emosteer.engine.worker import hooks, ops  # noqa: E402

E, L_BANK = 5, 32


def triton_ready() -> bool:
    """Triton kernels can run: a GPU, or Triton's interpreter on CPU tensors."""
    if not ops.TRITON_OP:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


class Rig:
    """Device, sizes and timers: the GPU run, or the CPU smoke run of the same code path."""

    def __init__(self, smoke: bool, quick: bool):
        self.smoke, self.quick = smoke, quick
        self.device = torch.device("cpu" if smoke else "cuda")
        self.cuda = self.device.type == "cuda"
        self.triton = triton_ready()
        if smoke:
            self.hidden, self.layers, self.vocab, self.ffn, self.heads, self.kv = 64, 2, 1000, 128, 2, 1
            self.Ts, self.Hs, self.batch = (1, 7, 40), (64, 96), 8
            self.sweep_cases = ((64, 40), (64, 1))
        else:
            self.hidden, self.layers, self.vocab, self.ffn, self.heads, self.kv = 4096, 4, 32000, 14336, 32, 8
            self.Ts, self.Hs, self.batch = (1, 64, 256, 1024, 8192), (4096, 8192), 256
            # (H, T), most wanted first: the sweep stops at its time budget
            self.sweep_cases = ((4096, 8192), (4096, 256), (4096, 1), (4096, 1024), (8192, 8192), (8192, 256),
                                (4096, 64), (4096, 32768), (8192, 1), (8192, 1024), (4096, 16), (4096, 4096),
                                (8192, 64))
        self.g = torch.Generator(device=self.device).manual_seed(0)

    def randn(self, *shape, dtype=torch.float32):
        return torch.randn(*shape, device=self.device, generator=self.g).to(dtype)

    def randint(self, low, high, shape):
        return torch.randint(low, high, shape, device=self.device, generator=self.g, dtype=torch.int32)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, iters=200, warmup=20):
        """Median us per call (CUDA events on the GPU, the host clock on CPU)."""
        if self.smoke:
            iters, warmup = 3, 1
        for _ in range(warmup):
            fn()
        times = []
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(iters):
            if self.cuda:
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1000)
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e6)
        return sorted(times)[len(times) // 2]

    def host_cost(self, fn, calls=500):
        """Mean host time per call over back-to-back calls (launch-bound: the eager launch cost)."""
        calls = 5 if self.smoke else calls
        fn()
        self.sync()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return (time.perf_counter() - t) / calls * 1e6

    def graph(self, fn):
        """A replayable callable of fn: a CUDA graph on the GPU, fn itself on CPU."""
        if not self.cuda:
            return fn
        fn()  # compile / warm up before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    def graphed(self, fn, adds=32, iters=None):
        """Per-call time of fn inside one CUDA graph of `adds` calls (launch cost amortized)."""
        adds = 2 if self.smoke else adds
        replay = self.graph(lambda: [fn() for _ in range(adds)])
        return self.time(replay, iters=iters or (30 if self.quick else 100)) / adds


def reference(x, rows, coeff, bank, layer):
    out = x.double().clone()
    steered = rows[: x.shape[0]] >= 0
    idx = steered.nonzero().squeeze(1)
    out[idx] += coeff[rows[idx].long(), layer].double() @ bank[layer].double()
    return out


def kernel_variants(rig):
    """Ways in to check: the op, the eager path, and (with Triton) each kernel variant launched directly."""
    variants = {"op": torch.ops.emosteer.steer_add_, "eager": ops.steer_add_eager}
    if rig.triton:
        from vllm_emosteer.kernels.steer_add import steer_add_triton

        for block_t, block_h in ((1, 128), (4, 256), (16, 64)):
            variants[f"kernel T{block_t}/H{block_h}"] = (
                lambda x, r, c, b, layer, bt=block_t, bh=block_h: steer_add_triton(x, r, c, b, layer, bh, None, bt))
    return variants


def check_kernel(rig):
    Hs = (100, 64) if rig.smoke else (100, 4096, 5000)
    variants = kernel_variants(rig)
    for name, call in variants.items():
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
            for T in (0, 1, 7, 300):
                for H in Hs:
                    wide = rig.randn(T, H + 8, dtype=dtype)
                    x = wide[:, :H]
                    rows = rig.randint(-1, 6, (T + 3,))
                    if T >= 40:
                        rows[16:40] = -1  # whole tiles without a steered token
                    coeff = rig.randn(6, 3, E)
                    bank = rig.randn(3, E, H)
                    wide[:, H:] = float("nan")
                    expected, before = reference(x, rows, coeff, bank, 2), x.clone()
                    call(x, rows, coeff, bank, 2)
                    steered = rows[:T] >= 0
                    assert torch.isnan(wide[:, H:]).all(), f"{name}: wrote outside x"
                    torch.testing.assert_close(x.double()[steered], expected[steered], rtol=tol, atol=tol)
                    assert torch.equal(x[~steered], before[~steered]), f"{name}: -1 rows changed"
    return f"{', '.join(variants)} == float64 reference (3 dtypes, T 0/1/7/300, H {Hs}, -1 rows, strided rows)"


def check_graph_replay(rig):
    T, H = (40, 64) if rig.smoke else (256, 4096)
    x_static = torch.zeros(T, H, device=rig.device, dtype=torch.bfloat16)
    rows = torch.full((T,), -1, device=rig.device, dtype=torch.int32)
    coeff = torch.zeros(T, 1, E, device=rig.device)
    bank = rig.randn(1, E, H)
    source = rig.randn(T, H, dtype=torch.bfloat16)

    def step():
        x_static.copy_(source)
        torch.ops.emosteer.steer_add_(x_static, rows, coeff, bank, 0)

    replay = rig.graph(step)
    for k in range(4):  # new rows and coefficients each replay, written in place as the runner does
        rows.copy_(rig.randint(-1, T, (T,)))
        coeff.copy_(rig.randn(T, 1, E) * (k + 1))
        replay()
        expected = reference(source, rows, coeff, bank, 0)
        torch.testing.assert_close(x_static.double(), expected, rtol=1.6e-2, atol=1.6e-2)
    return ("CUDA graph" if rig.cuda else "eager (no CUDA graphs on CPU)") + \
        " replay follows rewritten row/coefficient buffers (4 replays)"


def check_compile(rig):
    """The op inside torch.compile with a dynamic T (on CUDA Inductor lowers the triton_op to the kernel itself)."""
    H = 64 if rig.smoke else 4096
    rows = torch.full((512,), -1, device=rig.device, dtype=torch.int32)
    coeff, bank = rig.randn(8, 2, E), rig.randn(2, E, H)

    def f(x):
        y = x * 2
        torch.ops.emosteer.steer_add_(y, rows, coeff, bank, 1)
        return y + 1

    # CUDA: Inductor, which lowers the triton_op to the kernel; CPU smoke: aot_eager (seconds, no C++ build)
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="inductor" if rig.cuda else "aot_eager")
    for T in (5, 64, 300):
        rows.copy_(rig.randint(-1, 8, (512,)))
        coeff.mul_(1.5)
        x = rig.randn(T, H)
        expected = reference(x * 2, rows, coeff, bank, 1) + 1
        torch.testing.assert_close(compiled(x).double(), expected, rtol=1e-4, atol=1e-4)
    return "op inside torch.compile (fullgraph, dynamic T 5/64/300) == float64 reference"


def llama(rig, layers, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=rig.hidden, intermediate_size=rig.ffn, num_hidden_layers=layers,
                         num_attention_heads=rig.heads, num_key_value_heads=rig.kv, vocab_size=rig.vocab)
    torch.manual_seed(0)
    with torch.device(rig.device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def steering_state(rig, model, max_tokens, slots):
    """The runtime's fields the hooks read, and the plugin's eager path (no host plan: as under CUDA graphs)."""
    H, L = model.config.hidden_size, model.config.num_hidden_layers
    state = SimpleNamespace(
        options=SimpleNamespace(mode="fused"),
        row_of_token=SimpleNamespace(gpu=torch.full((max_tokens,), -1, device=rig.device, dtype=torch.int32)),
        coeff=SimpleNamespace(gpu=torch.zeros(slots, L, E, device=rig.device)),
        device_vectors=rig.randn(L, E, H) * 0.5,
    )
    state.steer_eager = lambda x, row: ops.steer_add_eager(x, state.row_of_token.gpu, state.coeff.gpu, state.device_vectors, row)
    state.handles = flattening_hooks(model, state)
    return state


def flattening_hooks(model, state):
    """transformers' attention returns [B, S, H]; vLLM's is [T, H]. Flatten (a view: the add lands in place) and
    steer through the plugin's own hook body."""
    handles = []
    for index, layer in hooks.local_decoder_layers(model).items():
        def after_attention(_module, _args, output, row=index):
            out = output[0] if isinstance(output, tuple) else output
            hooks._steer(out.view(-1, out.shape[-1]), state, row)
            return output

        handles.append(layer.self_attn.register_forward_hook(after_attention))
    return handles


@torch.no_grad()
def check_model(rig):
    layers = 2
    model = llama(rig, layers, torch.float32)
    B, S = 8, 16
    state = steering_state(rig, model, B * S, B)
    ids = torch.randint(0, rig.vocab, (B, S), device=rig.device, generator=rig.g)
    state.coeff.gpu.copy_(rig.randn(B, layers, E))
    all_rows = torch.arange(B, device=rig.device, dtype=torch.int32).repeat_interleave(S)
    state.row_of_token.gpu.fill_(-1)
    plain = model(input_ids=ids, use_cache=False).logits
    state.row_of_token.gpu.copy_(all_rows)
    eager = model(input_ids=ids, use_cache=False).logits
    assert (eager - plain).abs().max() > 1e-2, "steering did not change the logits"
    alone = []
    for b in range(B):  # each sequence alone, with its own slot
        state.row_of_token.gpu.fill_(-1)
        state.row_of_token.gpu[:S] = b
        alone.append(model(input_ids=ids[b: b + 1], use_cache=False).logits)
    torch.testing.assert_close(eager, torch.cat(alone), rtol=1e-3, atol=1e-3)
    state.row_of_token.gpu.copy_(all_rows)
    static_ids = ids.clone()
    out = {}

    def forward():
        out["logits"] = model(input_ids=static_ids, use_cache=False).logits

    replay = rig.graph(forward)
    replay()
    torch.testing.assert_close(out["logits"], eager, rtol=1e-3, atol=1e-3)
    for h in state.handles:
        h.remove()
    return (f"Llama ({rig.hidden} wide, {layers} layers, fp32) through flattening hooks: steering changes logits; "
            f"mixed batch == per-sequence runs; {'CUDA-graph' if rig.cuda else 'repeated'} logits == eager")


def copy_bandwidth(rig):
    a = torch.empty(1 << (16 if rig.smoke else 28), device=rig.device, dtype=torch.uint8)
    b = torch.empty_like(a)
    us = rig.time(lambda: b.copy_(a), iters=50)
    return 2 * a.numel() / (us * 1e-6) / 1e9  # GB/s, read + write


def bench_kernel(rig, T, H, bandwidth):
    requests = T if T <= 1024 else 256
    x = rig.randn(T, H, dtype=torch.bfloat16)
    rows = (torch.arange(T, device=rig.device) * requests // T).to(torch.int32)
    coeff = rig.randn(requests, L_BANK, E)
    bank = rig.randn(L_BANK, E, H)
    floor = 2 * T * H * 2 / (bandwidth * 1e9) * 1e6
    bounds = torch.searchsorted(rows, torch.arange(requests + 1, device=rig.device, dtype=torch.int32)).tolist()
    per_request = [(s, e, r) for r, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))]

    def loop():
        for s, e, r in per_request:
            x[s:e] += (coeff[r, 3] @ bank[3]).to(x.dtype)

    result = {"T": T, "H": H, "requests": requests, "floor_us": floor}
    result["loop_us"] = rig.time(loop, iters=5 if rig.quick or requests > 256 else 20, warmup=2)
    result["torch_us"] = rig.time(lambda: ops.steer_add_torch(x, rows, coeff, bank, 3))
    result["op_us"] = rig.time(lambda: torch.ops.emosteer.steer_add_(x, rows, coeff, bank, 3))
    result["eager_us"] = rig.time(lambda: ops.steer_add_eager(x, rows, coeff, bank, 3))
    result["graphed_us"] = rig.graphed(lambda: torch.ops.emosteer.steer_add_(x, rows, coeff, bank, 3))
    result["graphed_over_floor"] = result["graphed_us"] / floor
    result["torch_over_eager"] = result["torch_us"] / result["eager_us"]
    return result


def launch_costs(rig):
    """Host cost of one eager call, each way in (T=256, H=4096: the GPU work is ~2 us, so launch-bound)."""
    T, H = (7, 64) if rig.smoke else (256, 4096)
    x = rig.randn(T, H, dtype=torch.bfloat16)
    rows, coeff, bank = rig.randint(0, 4, (T,)), rig.randn(4, 2, E), rig.randn(2, E, H)
    costs = {"op (torch.ops.emosteer.steer_add_)": lambda: torch.ops.emosteer.steer_add_(x, rows, coeff, bank, 1),
             "eager path (ops.steer_add_eager)": lambda: ops.steer_add_eager(x, rows, coeff, bank, 1),
             "torch gather + matmul": lambda: ops.steer_add_torch(x, rows, coeff, bank, 1)}
    if rig.triton:
        from vllm_emosteer.kernels.steer_add import block_config, kernel_call

        kernel, grid, args, meta = kernel_call(x, rows, coeff, bank, 1, block_config(H, T))
        costs["kernel[grid] (Triton launcher alone)"] = lambda: kernel[grid](*args, **meta)
    return {name: rig.host_cost(fn) for name, fn in costs.items()}


def sweep_configs(H, T):
    for block_t in (1, 2, 4, 8, 16, 32):
        if block_t > 1 and block_t > T:
            continue
        for block_h in (128, 256, 512, 1024, 2048, 4096):
            if block_h > max(128, 1 << (H - 1).bit_length()):
                continue
            for warps in (1, 2, 4, 8):
                per_thread = block_t * block_h / (32 * warps)
                if 4 <= per_thread <= 128 or (block_t * block_h <= 128 and warps == 1):
                    yield block_t, block_h, warps


def sweep(rig, deadline, progress):
    from vllm_emosteer.kernels.steer_add import steer_add_triton

    results = {}
    for H, T in rig.sweep_cases:
        if time.time() > deadline:
            progress(f"sweep: time budget spent before H={H} T={T}")
            break
        x = rig.randn(T, H, dtype=torch.bfloat16)
        rows = (torch.arange(T, device=rig.device, dtype=torch.int32) * 7) % 256
        rows[::5] = -1  # a few unsteered tokens, as in a mixed batch
        coeff, bank = rig.randn(256, L_BANK, E), rig.randn(L_BANK, E, H)
        times = {}
        configs = list(sweep_configs(H, T)) if not rig.smoke else [(1, 64, 1), (4, 64, 2)]
        for block_t, block_h, warps in configs:
            if time.time() > deadline:
                break
            times[f"{block_t}/{block_h}/{warps}"] = rig.graphed(
                lambda: steer_add_triton(x, rows, coeff, bank, 3, block_h, warps, block_t), adds=16, iters=30)
        results[f"{H}/{T}"] = times
        best = min(times, key=times.get) if times else None
        progress(f"sweep H={H} T={T}: {len(times)} configs, best {best} {times.get(best, 0):.2f} us")
        del x
    return results


def table_from_sweep(results, bandwidth):
    """The block table (best per (H, T)) and, per H, the config best over all T (for a symbolic T)."""
    best, symbolic, rows = {}, {}, []
    for key, times in results.items():
        if not times:
            continue
        H, T = map(int, key.split("/"))
        config = min(times, key=times.get)
        best[(H, T)] = tuple(map(int, config.split("/")))
        floor = 2 * T * H * 2 / (bandwidth * 1e9) * 1e6
        rows.append((H, T, config, times[config], floor))
    for H in sorted({h for h, _ in best}):  # T >= 16: below, token tiles are not swept (BLOCK_T <= T)
        keys = [k for k in results if k.startswith(f"{H}/") and results[k] and int(k.split("/")[1]) >= 16]
        common = set.intersection(*(set(results[k]) for k in keys))
        score = {c: sum(math.log(results[k][c] / min(results[k].values())) for k in keys) for c in common}
        if score:
            symbolic[H] = tuple(map(int, min(score, key=score.get).split("/")))
    return best, symbolic, rows


@torch.no_grad()
def bench_model(rig):
    """Decode-like step: 256 sequences, one token each (no KV cache), every sequence its own mix."""
    layers, batch = rig.layers, rig.batch
    model = llama(rig, layers, torch.bfloat16)
    ids = torch.randint(0, rig.vocab, (batch, 1), device=rig.device, generator=rig.g)
    times = {}
    for steered in (False, True):
        state = steering_state(rig, model, batch, batch) if steered else None
        if steered:
            state.coeff.gpu.copy_(rig.randn(batch, layers, E))
            state.row_of_token.gpu.copy_(torch.arange(batch, device=rig.device, dtype=torch.int32))
        for _ in range(3):
            model(input_ids=ids, use_cache=False)
        name = "steered" if steered else "unsteered"
        times[name + "_eager"] = rig.time(lambda: model(input_ids=ids, use_cache=False), iters=30)
        times[name] = rig.time(rig.graph(lambda: model(input_ids=ids, use_cache=False)), iters=100)
        if steered:
            for h in state.handles:
                h.remove()
    times["ratio"] = times["steered"] / times["unsteered"]
    times["ratio_eager"] = times["steered_eager"] / times["unsteered_eager"]
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, seconds: the whole path, for CI")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also sweep (BLOCK_T, BLOCK_H, num_warps) by (H, T)")
    parser.add_argument("--sweep-budget-s", type=float, default=150, help="stop sweeping after this long")
    parser.add_argument("--json", help="write all results here (rewritten after each stage)")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/kernel.py needs a CUDA GPU (or --smoke for the CPU run of the same path)", file=sys.stderr)
        return 2
    rig = Rig(args.smoke, args.quick)
    report = {"device": torch.cuda.get_device_name() if rig.cuda else "cpu (smoke)", "torch": torch.__version__,
              "triton_op": ops.TRITON_OP, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)

    def say(line):
        print(line, flush=True)

    report["checks"] = []
    failed = 0
    for check in (check_kernel, check_graph_replay, check_compile, check_model):
        try:
            report["checks"].append("OK " + check(rig))
        except Exception as exc:  # report and go on to the timings: one run must give everything
            failed += 1
            report["checks"].append(f"FAIL {check.__name__}: {type(exc).__name__}: {str(exc)[:2000]}")
        say(report["checks"][-1])
    save()
    bandwidth = copy_bandwidth(rig)
    report["copy_bandwidth_GBps"] = bandwidth
    say(f"\n{report['device']}, copy bandwidth {bandwidth:.0f} GB/s, bf16, E={E}")
    report["launch_costs_us"] = launch_costs(rig)
    for name, us in report["launch_costs_us"].items():
        say(f"eager host cost per call, {name}: {us:.1f} us")
    rows = []
    for H in rig.Hs:
        for T in rig.Ts:
            rows.append(bench_kernel(rig, T, H, bandwidth))
            report["kernel"] = rows
            save()
    say("\n| T | H | requests | floor us | per-request loop us | torch us | op eager us | direct eager us | "
        "graphed us/add | graphed / floor | torch / direct |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        say(f"| {r['T']} | {r['H']} | {r['requests']} | {r['floor_us']:.1f} | {r['loop_us']:.0f} | "
            f"{r['torch_us']:.1f} | {r['op_us']:.1f} | {r['eager_us']:.1f} | {r['graphed_us']:.2f} | "
            f"{r['graphed_over_floor']:.2f} | {r['torch_over_eager']:.1f} |")
    try:
        report["model"] = bench_model(rig)
        m = report["model"]
        say(f"\nmodel-level decode step (Llama, {rig.hidden} wide, {rig.layers} layers, batch {rig.batch}, distinct "
            f"mixes): graphed unsteered {m['unsteered']:.0f} us, steered {m['steered']:.0f} us, ratio "
            f"{m['ratio']:.3f}; eager {m['unsteered_eager']:.0f} / {m['steered_eager']:.0f} us, "
            f"ratio {m['ratio_eager']:.3f}")
    except Exception as exc:
        failed += 1
        report["model"] = f"FAIL {type(exc).__name__}: {exc}"
        say(report["model"])
    save()
    if args.sweep and rig.triton:
        report["sweep"] = sweep(rig, time.time() + args.sweep_budget_s, say)
        save()
        best, symbolic, table = table_from_sweep(report["sweep"], bandwidth)
        report["block_table"] = {f"{h}/{t}": c for (h, t), c in best.items()}
        report["symbolic_t"] = symbolic
        say("\n| H | T | best BLOCK_T/BLOCK_H/warps | us per add (graphed) | floor us | x floor |")
        say("|---|---|---|---|---|---|")
        for H, T, config, us, floor in sorted(table):
            say(f"| {H} | {T} | {config} | {us:.2f} | {floor:.2f} | {us / floor:.2f} |")
        say(f"best over all T (symbolic T), per H: {symbolic}")
        save()
    elif args.sweep:
        say("sweep skipped: no Triton kernels here (a GPU, or TRITON_INTERPRET=1 on CPU)")
    say(f"\n{len(report['checks']) - failed} checks OK, {failed} failed" if failed else "\nall checks OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
