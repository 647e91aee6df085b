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
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the table or the JSON

WORKLOADS = {  # name: (prompt tokens, generated tokens)
    "decode": (32, 64),
    "prefill": (384, 4),
}
EMOTIONS = ["joy", "anger", "disgust", "fear", "sadness"]


def make_specs(mode: str, n: int, seed: int = 0):
    from vllm_emosteer import steer

    rng = random.Random(seed)
    if mode in ("plain", "unsteered"):
        return [None] * n
    if mode == "same-mix":
        return [steer(joy=0.8, fear=0.3)] * n
    specs, seen = [], set()
    while len(specs) < n:  # every request its own mix and intensity, all distinct
        k = rng.randint(1, 3)
        mix = {e: round(rng.uniform(-1.0, 1.5), 3) for e in rng.sample(EMOTIONS, k)}
        key = tuple(sorted(mix.items()))
        if key not in seen and all(mix.values()):
            seen.add(key)
            specs.append(steer(**mix))
    return specs


def run_once(llm, workload: str, specs, n: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt_len, gen_len = WORKLOADS[workload]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--vectors")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compiled", choices=["both", "eager", "compiled"], default="both")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    from vllm_emosteer.default_model import model_path

    model = args.model or str(model_path())
    n = args.requests
    results: dict = {}
    settings = [("eager", True), ("compiled", False)]
    settings = [s for s in settings if args.compiled in ("both", s[0])]
    for setting, eager in settings:
        engines = [("plain", None), ("steering", "fused")] + ([("naive", "naive")] if eager else [])
        for engine_name, mode in engines:
            llm = make_engine(model, args.vectors, eager, mode, max_num_seqs=min(n, 256))
            modes = {"plain": ["plain"], "steering": ["unsteered", "same-mix", "distinct"], "naive": ["naive"]}
            for workload in WORKLOADS:
                run_once(llm, workload, make_specs("unsteered", min(n, 16)), min(n, 16))  # warm-up
                for bench_mode in modes[engine_name]:
                    specs = make_specs("distinct" if bench_mode == "naive" else bench_mode, n)
                    best = max(run_once(llm, workload, specs, n) for _ in range(args.repeats))
                    results.setdefault(setting, {}).setdefault(workload, {})[bench_mode] = round(best, 1)
                    print(f"[{setting}/{workload}] {bench_mode}: {best:.1f} tok/s", file=sys.stderr)
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    for setting in results:
        for workload, row in results[setting].items():
            base = row["unsteered"]
            row["ratio_to_unsteered"] = {m: round(v / base, 3) for m, v in row.items() if isinstance(v, float)}
    report = {"model": model, "requests": n, "workloads": WORKLOADS, "tokens_per_s": results}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"\nThroughput, tokens/s (prompt + generated), {n} requests, best of {args.repeats}:")
        print("| setting | workload | plain vLLM | unsteered | same mix | distinct mixes | naive loop | "
              "distinct / unsteered | naive / unsteered |")
        print("|---|---|---|---|---|---|---|---|---|")
        for setting, workloads in results.items():
            for workload, row in workloads.items():
                r = row["ratio_to_unsteered"]
                print(f"| {setting} | {workload} | {row['plain']} | {row['unsteered']} | {row['same-mix']} | "
                      f"{row['distinct']} | {row.get('naive', '-')} | {r['distinct']} | {r.get('naive', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
