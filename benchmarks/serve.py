"""Serving load: request throughput, TTFT and inter-token latency (p50/p99), unsteered vs mixed-steered traffic,
at several concurrency levels, against a real `vllm serve` (started here on the default model, or --url).

    python benchmarks/serve.py [--concurrency 1 8 32] [--max-tokens 32] [--url http://host:port]
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = None
    if not args.url:
        from server_helpers import Server

        from vllm_emosteer.default_model import model_path

        server = Server(model_path())
        args.url = server.url
    results = {}
    try:
        for concurrency in args.concurrency:
            requests = max(8, 3 * concurrency)
            asyncio.run(level(args.url, "unsteered", concurrency, min(requests, 8), args.max_tokens))  # warm-up
            for traffic in ("unsteered", "steered"):
                r = asyncio.run(level(args.url, traffic, concurrency, requests, args.max_tokens))
                results[f"{traffic}@{concurrency}"] = r
                print(f"[{traffic} x{concurrency}] {r}", file=sys.stderr)
    finally:
        if server:
            server.stop()
    if args.json:
        print(json.dumps(results))
        return 0
    print("| concurrency | traffic | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        traffic, concurrency = key.split("@")
        print(f"| {concurrency} | {traffic} | {r['req_per_s']:.2f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
              f"{r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
