"""Offline-engine throughput of steering vs unsteered, on the default model (or --model with --vectors).

One process, same prompts and lengths (ignore_eos, fixed max_tokens), same engine settings. Modes:
  plain      vLLM without steering enabled (the plugin's wrappers are no-ops)
  unsteered  the steering engine, no request steered
  same-mix   the steering engine, every request the same mix
  distinct   the steering engine, every request its own random mix and intensity (all distinct)
  naive      an engine with mode "naive": a Python loop over the batch's requests in every layer, like
             hook-based peers (eager only: a Python loop cannot be compiled)
Workloads: decode-heavy (short prompts, long answers) and prefill-heavy (long prompts, short answers);
eager and compiled. Tokens/s counts prompt + generated tokens. Each number is the best of --repeats runs.

    python benchmarks/throughput.py [--requests 256] [--json]

The distinct-configs sweep (--sweep) measures how throughput changes as more requests carry distinct steering, in
the terms peers publish: plain vLLM, unsteered, and K = 1, 8, 32, 128, 256 distinct mixes spread over the batch
(request i gets mix i % K), for each workload, eager and compiled. The batch is --requests (default 256,
max_num_seqs = min(requests, 256)); K above it is capped at it. A batch of 256 fits on the 2-core machine (its KV
cache, about 1.5 GiB at most, fits in the default 2 GiB of VLLM_CPU_KVCACHE_SPACE); it is only slow. To keep the
whole sweep near 15 minutes on 2 idle cores (an estimate: two compilations of a few minutes and 28 cells, 7 per
setting and workload, of 15-20 s each), it uses shorter workloads than the modes above (decode: 32-token prompts, 64
generated, the output length of the vLLM fork's published point; prefill: 128-token prompts, 4 generated) and
--repeats defaults to 1; each further repeat adds about 8-10 minutes. Repeats are interleaved (every cell once, then
every cell again, each pass starting at another cell), so slow drift from other load falls on all cells alike and
no cell is always measured first. It prints a markdown table (tokens/s and
the ratio to unsteered), writes the JSON report (--json-out) and, with --plot FILE, a plot of tokens/s normalised to
each engine's own baseline against K (log axis): our eager and compiled curves beside the peers' published points,
labelled with their hardware.

    python benchmarks/throughput.py --sweep [--requests 256] [--repeats 2] [--json-out FILE] [--plot FILE]

Differences of a few percent are below the sweep's run-to-run spread on a shared CPU (it prints the spread).
--pairs N resolves them for the sweep's hardest case: every request its own mix (K = the batch) against unsteered,
in N adjacent pairs whose order alternates, one ratio per pair, reported as the median and min-max.

    python benchmarks/throughput.py --pairs 6 [--compiled compiled] [--workloads decode prefill]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB: enough for the sweep's 256 requests too
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the table or the JSON

WORKLOADS = {  # name: (prompt tokens, generated tokens)
    "decode": (32, 64),
    "prefill": (384, 4),
}
SWEEP_WORKLOADS = {
    "decode": (32, 64),
    "prefill": (128, 4),
}
SWEEP_K = (1, 8, 32, 128, 256)
EMOTIONS = ["joy", "anger", "disgust", "fear", "sadness"]
# Published distinct-configs points of peers, tokens/s on their own hardware (docs/performance.md cites them).
PEERS = [
    {"name": "EasySteer", "baseline": 30633, "points": {1: 23211, 8: 19923, 32: 15851, 64: 11082, 128: 8733, 256: 5620},
     "setup": "in_graph mode, batch 256, 128 tokens, 1.5B model, 1x RTX PRO 6000 Blackwell",
     "source": "github.com/ZJU-REAL/EasySteer experiment/efficiency/README.md (2026-08)"},
    {"name": "RhizoNymph/vllm fork", "baseline": 3590, "points": {16: 1632},
     "setup": "every request distinct, batch 16, 64 output tokens, Gemma 3 4B, H100 NVL",
     "source": "github.com/RhizoNymph/vllm upstream/RFC.md (worst case; batch 16 from its per_request_n16 setup)"},
]


def random_mixes(n: int, seed: int = 0):
    """n distinct random mixes (1-3 emotions, intensities in [-1, 1.5]), as request steering."""
    from vllm_emosteer import steer

    rng = random.Random(seed)
    specs, seen = [], set()
    while len(specs) < n:
        k = rng.randint(1, 3)
        mix = {e: round(rng.uniform(-1.0, 1.5), 3) for e in rng.sample(EMOTIONS, k)}
        key = tuple(sorted(mix.items()))
        if key not in seen and all(mix.values()):
            seen.add(key)
            specs.append(steer(**mix))
    return specs


def make_specs(mode: str, n: int, seed: int = 0):
    from vllm_emosteer import steer

    if mode in ("plain", "unsteered"):
        return [None] * n
    if mode == "same-mix":
        return [steer(joy=0.8, fear=0.3)] * n
    return random_mixes(n, seed)  # every request its own mix and intensity, all distinct


def spread_specs(k: int, n: int):
    """K distinct mixes spread over n requests: request i gets mix i % K."""
    mixes = random_mixes(k)
    return [mixes[i % k] for i in range(n)]


def run_once(llm, lengths: tuple[int, int], specs, n: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt_len, gen_len = lengths
    rng = random.Random(1)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000) for _ in range(prompt_len)]) for _ in range(n)]
    params = [SamplingParams(max_tokens=gen_len, ignore_eos=True, temperature=0, extra_args=s) for s in specs]
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outputs)
    return tokens / elapsed


def make_engine(model: str, vectors: str | None, eager: bool, mode: str | None, max_num_seqs: int):
    from vllm import LLM

    extra = {}
    if mode is not None:
        options = {"vectors": vectors} if vectors else {}
        if mode == "naive":
            options["mode"] = "naive"
        extra = {"emosteer": options}
    return LLM(model=model, max_model_len=1024, enforce_eager=eager, max_num_seqs=max_num_seqs,
               max_num_batched_tokens=4096, additional_config=extra, seed=0, dtype="bfloat16")


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def chosen_settings(args) -> list[tuple[str, bool]]:
    return [s for s in (("eager", True), ("compiled", False)) if args.compiled in ("both", s[0])]


def ratios(row: dict) -> dict:
    base = row["unsteered"]
    return {m: round(v / base, 3) for m, v in row.items() if isinstance(v, float)}


# ---- the modes (the original table) ----------------------------------------------------------------------------
def run_modes(args, model: str) -> dict:
    n = args.requests
    results: dict = {}
    workloads = {w: WORKLOADS[w] for w in args.workloads}
    for setting, eager in chosen_settings(args):
        engines = [("plain", None), ("steering", "fused")] + ([("naive", "naive")] if eager else [])
        for engine_name, mode in engines:
            llm = make_engine(model, args.vectors, eager, mode, max_num_seqs=min(n, 256))
            modes = {"plain": ["plain"], "steering": ["unsteered", "same-mix", "distinct"], "naive": ["naive"]}
            for workload, lengths in workloads.items():
                run_once(llm, lengths, make_specs("unsteered", min(n, 16)), min(n, 16))  # warm-up
                for bench_mode in modes[engine_name]:
                    specs = make_specs("distinct" if bench_mode == "naive" else bench_mode, n)
                    best = max(run_once(llm, lengths, specs, n) for _ in range(args.repeats))
                    results.setdefault(setting, {}).setdefault(workload, {})[bench_mode] = round(best, 1)
                    print(f"[{setting}/{workload}] {bench_mode}: {best:.1f} tok/s", file=sys.stderr)
            shutdown(llm)
    for setting in results:
        for row in results[setting].values():
            row["ratio_to_unsteered"] = ratios(row)
    return {"model": model, "requests": n, "workloads": workloads, "tokens_per_s": results}


def print_modes(report: dict, repeats: int) -> None:
    print(f"\nThroughput, tokens/s (prompt + generated), {report['requests']} requests, best of {repeats}:")
    print("| setting | workload | plain vLLM | unsteered | same mix | distinct mixes | naive loop | "
          "distinct / unsteered | naive / unsteered |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setting, workloads in report["tokens_per_s"].items():
        for workload, row in workloads.items():
            r = row["ratio_to_unsteered"]
            print(f"| {setting} | {workload} | {row['plain']} | {row['unsteered']} | {row['same-mix']} | "
                  f"{row['distinct']} | {row.get('naive', '-')} | {r['distinct']} | {r.get('naive', '-')} |")


# ---- the distinct-configs sweep --------------------------------------------------------------------------------
def sweep_ks(n: int) -> list[int]:
    return sorted({min(k, n) for k in SWEEP_K})


def run_sweep(args, model: str) -> dict:
    n = args.requests
    ks = sweep_ks(n)
    workloads = {w: SWEEP_WORKLOADS[w] for w in args.workloads}
    cells = {"plain": ["plain"], "steering": ["unsteered"] + [f"K={k}" for k in ks]}
    specs = {"plain": [None] * n, "unsteered": [None] * n, **{f"K={k}": spread_specs(k, n) for k in ks}}
    results: dict = {}
    started = time.perf_counter()
    for setting, eager in chosen_settings(args):
        for engine_name, mode in (("plain", None), ("steering", "fused")):
            llm = make_engine(model, args.vectors, eager, mode, max_num_seqs=min(n, 256))
            for workload, lengths in workloads.items():
                run_once(llm, lengths, [None] * min(n, 16), min(n, 16))  # warm-up
                row = results.setdefault(setting, {}).setdefault(workload, {})
                for repeat in range(args.repeats):  # interleaved: drift falls on every cell alike
                    names = cells[engine_name]
                    shift = repeat * len(names) // args.repeats  # each pass starts elsewhere: no cell always first
                    for cell in names[shift:] + names[:shift]:
                        tps = run_once(llm, lengths, specs[cell], n)
                        row[cell] = round(max(row.get(cell, 0.0), tps), 1)
                        row.setdefault("runs", {}).setdefault(cell, []).append(round(tps, 1))
                        print(f"[sweep {setting}/{workload}] {cell}: {tps:.1f} tok/s", file=sys.stderr)
            shutdown(llm)
    for setting in results:
        for row in results[setting].values():
            row["ratio_to_unsteered"] = ratios(row)
    return {
        "kind": "distinct-configs sweep", "model": model, "requests": n, "max_num_seqs": min(n, 256),
        "repeats": args.repeats, "ks": ks, "workloads": workloads, "tokens_per_s": results, "peers": PEERS,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "kv_cache_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def run_pairs(args, model: str) -> dict:
    """Every request its own mix (K = the batch) against unsteered in adjacent pairs, in alternating order (which
    comes first swaps each pair): one ratio per pair, so drift slower than a pair cancels within it."""
    n = args.requests
    k = max(sweep_ks(n))
    steered = f"K={k}"
    specs = {"unsteered": [None] * n, steered: spread_specs(k, n)}
    results: dict = {}
    for setting, eager in chosen_settings(args):
        llm = make_engine(model, args.vectors, eager, "fused", max_num_seqs=min(n, 256))
        for workload in args.workloads:
            lengths = SWEEP_WORKLOADS[workload]
            run_once(llm, lengths, [None] * min(n, 16), min(n, 16))  # warm-up
            ratios_ = []
            for i in range(args.pairs):
                order = ("unsteered", steered) if i % 2 == 0 else (steered, "unsteered")
                tps = {cell: run_once(llm, lengths, specs[cell], n) for cell in order}
                ratios_.append(round(tps[steered] / tps["unsteered"], 4))
                print(f"[pairs {setting}/{workload}] {order[0]} {tps[order[0]]:.1f}, {order[1]} {tps[order[1]]:.1f} "
                      f"tok/s: {ratios_[-1]:.3f}", file=sys.stderr)
            results.setdefault(setting, {})[workload] = {"ratios": ratios_, "median": statistics.median(ratios_),
                                                         "min": min(ratios_), "max": max(ratios_)}
        shutdown(llm)
    return {"kind": "pairs", "model": model, "requests": n, "steered": steered, "pairs": args.pairs,
            "workloads": {w: SWEEP_WORKLOADS[w] for w in args.workloads}, "ratio": results,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def print_pairs(report: dict) -> None:
    print(f"\n{report['steered']} (every request its own mix) / unsteered tokens/s, {report['pairs']} adjacent pairs "
          f"in alternating order, batch {report['requests']}:")
    print("| setting | workload | median | min-max |")
    print("|---|---|---|---|")
    for setting, workloads in report["ratio"].items():
        for workload, r in workloads.items():
            print(f"| {setting} | {workload} | {r['median']:.3f} | {r['min']:.3f}-{r['max']:.3f} |")


def run_spread(report: dict) -> tuple[float, float] | None:
    """How far repeated runs of one cell lie apart, (max - min) / max: the median and the largest over all cells
    (None without repeats). Differences between cells smaller than this are not resolved by the run."""
    spreads = [(max(v) - min(v)) / max(v) for workloads in report["tokens_per_s"].values()
               for row in workloads.values() for v in row.get("runs", {}).values() if len(v) > 1]
    return (statistics.median(spreads), max(spreads)) if spreads else None


def print_sweep(report: dict) -> None:
    ks = report["ks"]
    print(f"\nDistinct-configs sweep, tokens/s (prompt + generated) and the ratio to unsteered, batch "
          f"{report['max_num_seqs']} ({report['requests']} requests), best of {report['repeats']}, "
          f"{report['elapsed_s'] / 60:.1f} min:")
    print("| setting | workload | plain vLLM | unsteered | " + " | ".join(f"K = {k}" for k in ks)
          + " | worst K / unsteered |")
    print("|---|---|---|---|" + "---|" * len(ks) + "---|")
    for setting, workloads in report["tokens_per_s"].items():
        for workload, row in workloads.items():
            r = row["ratio_to_unsteered"]
            cells = [f"{row[f'K={k}']:.0f} ({r[f'K={k}']:.2f})" for k in ks]
            worst = min(r[f"K={k}"] for k in ks)
            print(f"| {setting} | {workload} | {row['plain']:.0f} ({r['plain']:.2f}) | {row['unsteered']:.0f} | "
                  + " | ".join(cells) + f" | {worst:.2f} |")
    spread = run_spread(report)
    if spread:
        print(f"\nRun-to-run spread of one cell, (max - min) / max over its {report['repeats']} runs: median "
              f"{spread[0]:.1%}, largest {spread[1]:.1%}.")


def plot_sweep(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    ks = report["ks"]
    styles = {"decode": "-", "prefill": "--"}
    markers = {"eager": "o", "compiled": "s"}
    lengths = report["workloads"]
    for setting, workloads in report["tokens_per_s"].items():
        for workload, row in workloads.items():
            r = row["ratio_to_unsteered"]
            prompt, generated = lengths[workload]
            ax.plot(ks, [r[f"K={k}"] for k in ks], styles.get(workload, "-"), marker=markers.get(setting, "o"),
                    label=f"vllm-emosteer {setting}, {workload} ({prompt} + {generated} tokens; plain vLLM = "
                          f"{r['plain']:.2f} x unsteered)")
    for peer, marker in zip(report["peers"], ("^", "*")):
        points = sorted((int(k), v) for k, v in peer["points"].items())  # keys are strings once read from JSON
        xs, ys = [k for k, _ in points], [v / peer["baseline"] for _, v in points]
        ax.plot(xs, ys, ":" if len(xs) > 1 else "", marker=marker, markersize=12 if marker == "*" else 7,
                color="grey" if len(xs) > 1 else "black", label=f"{peer['name']} ({peer['setup']})")
    ax.axhline(1.0, color="lightgrey", linewidth=1, zorder=0)
    spread = run_spread(report)
    if spread:
        ax.axhspan(1 - spread[0], 1 + spread[0], color="lightgrey", alpha=0.35, zorder=0,
                   label=f"run-to-run spread of one cell (median over cells, {report['repeats']} runs): "
                         f"+-{spread[0]:.0%}")
    ax.set_xscale("log", base=2)
    ticks = sorted(set(ks) | {int(k) for p in report["peers"] for k in p["points"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_ylim(0, 1.2)
    ax.set_xlabel("distinct steering configurations (mixes) in the batch, K")
    ax.set_ylabel("tokens/s / the same engine without steering")
    machine = report["machine"]
    ax.set_title(f"Throughput as configurations diversify. Ours: {os.path.basename(report['model'].rstrip('/'))}, "
                 f"bf16, batch {report['max_num_seqs']}, {machine['cpus']}-core CPU, {report['date'][:10]};\n"
                 "normalised to unsteered (ours) or to no steering (peers, their published numbers)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--vectors")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--repeats", type=int, help="best of this many runs per cell (default 2; --sweep: 1)")
    parser.add_argument("--compiled", choices=["both", "eager", "compiled"], default="both")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--sweep", action="store_true", help="the distinct-configs sweep (see above)")
    parser.add_argument("--json-out", help="write the JSON report to this file (--sweep: default "
                                           "throughput-sweep.json)")
    parser.add_argument("--plot", help="--sweep: write the plot to this file (PNG, SVG or PDF by its suffix)")
    parser.add_argument("--pairs", type=int, metavar="N", help="K = the batch against unsteered in N adjacent "
                                                                "pairs (the sweep's workloads; see above)")
    parser.add_argument("--report", metavar="JSON", help="--sweep: print the table and plot of a saved sweep "
                                                         "report instead of measuring")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.sweep else 2
    if (args.plot or args.report) and not args.sweep:
        parser.error("--plot and --report need --sweep")
    if args.report:
        with open(args.report) as f:
            report = json.load(f)
        if args.plot:
            plot_sweep(report, args.plot)
        print_sweep(report)
        return 0
    from vllm_emosteer.default_model import model_path

    model = args.model or str(model_path())
    if args.pairs:
        report = run_pairs(args, model)
        out = args.json_out
    elif args.sweep:
        report = run_sweep(args, model)
        out = args.json_out or "throughput-sweep.json"
    else:
        report = run_modes(args, model)
        out = args.json_out
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {out}", file=sys.stderr)
    if args.plot:
        plot_sweep(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    elif args.pairs:
        print_pairs(report)
    elif args.sweep:
        print_sweep(report)
    else:
        print_modes(report, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
