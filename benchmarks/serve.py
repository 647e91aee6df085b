"""Serving load: request throughput, TTFT and inter-token latency (p50/p99), unsteered vs mixed-steered traffic,
at several concurrency levels, against a real `vllm serve` (started here on the default model, or --url).

Each concurrency level runs --rounds rounds; a round measures both traffic kinds back to back, in alternating
order (unsteered first in even rounds, steered first in odd ones), so slow drifts of the machine fall on both.
Reported per cell: the median over rounds of each metric, the spread (min-max) of the median inter-token
latency, and the steered / unsteered ratio of the median inter-token latency: the median of the per-round
ratios, with their min-max.

    python benchmarks/serve.py [--concurrency 1 8 32] [--rounds 5] [--max-tokens 32] [--url http://host:port]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the table or the JSON

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
QUESTIONS = ["Tell me about your day.", "Describe your morning commute.", "What did you have for breakfast?",
             "How do you spend your weekends?", "Tell me about your neighbours."]
EMOTIONS = ["joy", "anger", "disgust", "fear", "sadness"]


def xargs_for(traffic: str, rng: random.Random):
    if traffic == "unsteered":
        return None
    names = rng.sample(EMOTIONS, rng.randint(1, 2))
    return {"emotions": names, "intensities": [round(rng.uniform(0.2, 1.0), 2) for _ in names]}


async def one(client, traffic, rng, max_tokens):
    extra = {"vllm_xargs": xargs_for(traffic, rng)} if traffic != "unsteered" else None
    start = time.perf_counter()
    stamps = []
    stream = await client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": rng.choice(QUESTIONS)}], max_tokens=max_tokens,
        temperature=0.7, stream=True, extra_body=dict(extra or {}, ignore_eos=True))
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    ttft = stamps[0] - start
    itl = list(np.diff(stamps)) if len(stamps) > 1 else []
    return ttft, itl


async def level(url, traffic, concurrency, requests, max_tokens):
    from openai import AsyncOpenAI

    rng = random.Random(concurrency)
    queue = list(range(requests))
    ttfts, itls = [], []
    async with AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        async def worker():
            while queue:
                queue.pop()
                ttft, itl = await one(client, traffic, rng, max_tokens)
                ttfts.append(ttft)
                itls.extend(itl)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = lambda v, q: float(np.percentile(v, q) * 1000)  # noqa: E731
    return {"req_per_s": requests / elapsed, "ttft_p50_ms": ms(ttfts, 50), "ttft_p99_ms": ms(ttfts, 99),
            "itl_p50_ms": ms(itls, 50), "itl_p99_ms": ms(itls, 99)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per concurrency level (alternating order)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = None
    if not args.url:
        from server_helpers import Server

        from vllm_emosteer.default_model import model_path

        server = Server(model_path())
        args.url = server.url
    results, ratios = {}, {}
    try:
        for concurrency in args.concurrency:
            requests = max(8, 3 * concurrency)
            asyncio.run(level(args.url, "unsteered", concurrency, min(requests, 8), args.max_tokens))  # warm-up
            rounds = {"unsteered": [], "steered": []}
            for i in range(args.rounds):
                for traffic in ("unsteered", "steered") if i % 2 == 0 else ("steered", "unsteered"):
                    r = asyncio.run(level(args.url, traffic, concurrency, requests, args.max_tokens))
                    rounds[traffic].append(r)
                    print(f"[round {i} {traffic} x{concurrency}] {r}", file=sys.stderr)
            for traffic, measured in rounds.items():
                cell = {k: float(np.median([m[k] for m in measured])) for k in measured[0]}
                itl = [m["itl_p50_ms"] for m in measured]
                results[f"{traffic}@{concurrency}"] = dict(cell, itl_p50_min_ms=min(itl), itl_p50_max_ms=max(itl),
                                                           rounds=measured)
            per_round = [s["itl_p50_ms"] / u["itl_p50_ms"] for s, u in zip(rounds["steered"], rounds["unsteered"])]
            ratios[concurrency] = {"median": float(np.median(per_round)), "min": min(per_round), "max": max(per_round)}
    finally:
        if server:
            server.stop()
    if args.json:
        print(json.dumps({"cells": results, "itl_ratio": ratios}))
        return 0
    print(f"{args.rounds} rounds per cell, each {args.max_tokens} tokens per request; medians over rounds")
    print()
    print("| concurrency | traffic | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms (min-max) | ITL p99 ms | "
          "steered / unsteered ITL p50 (min-max) |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        traffic, concurrency = key.split("@")
        ratio = ratios[int(concurrency)]
        shown = f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})" if traffic == "steered" else ""
        print(f"| {concurrency} | {traffic} | {r['req_per_s']:.2f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
              f"{r['itl_p50_ms']:.1f} ({r['itl_p50_min_ms']:.1f}-{r['itl_p50_max_ms']:.1f}) | {r['itl_p99_ms']:.1f} | "
              f"{shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
