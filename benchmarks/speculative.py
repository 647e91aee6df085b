"""What speculative decoding keeps under steering: generated tokens/s and draft acceptance, with and without steering,
with and without n-gram speculation, on the default model (or --model with --vectors).

One process, one engine per speculation setting, the same chat prompts (the eval's neutral questions) and lengths
(greedy, ignore_eos, fixed max_tokens) for every cell. Batches: `unsteered` (no request steered) and `steered`
(every request its own random mix and intensity over all five emotions). Acceptance comes from vLLM's own
counters (`vllm:spec_decode_num_accepted_tokens` / `..._num_draft_tokens`, taken as differences around each run):
the acceptance rate is accepted / proposed draft tokens, the acceptance length 1 + accepted / verify steps. Each
tokens/s is the best of --repeats runs. Output: a markdown table (or --json).

    python benchmarks/speculative.py [--requests 32] [--max-tokens 96] [--draft-tokens 3] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import time

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the table or the JSON

COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")


def counters(llm) -> dict[str, float]:
    return {m.name: m.value for m in llm.get_metrics() if m.name in COUNTERS}


def batches(requests: int, seed: int) -> dict[str, list]:
    from vllm_emosteer import steer
    from vllm_emosteer.emotions import EMOTIONS

    rng = random.Random(seed)
    steered = [steer(**{e: round(rng.uniform(-0.5, 1.5), 2) for e in EMOTIONS}) for _ in range(requests)]
    return {"unsteered": [None] * requests, "steered": steered}


def run(llm, prompts, extras, max_tokens: int) -> tuple[float, dict[str, float]]:
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args=e) for e in extras]
    before = counters(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = counters(llm)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return generated / elapsed, {name: after.get(name, 0) - before.get(name, 0) for name in COUNTERS}


def measure(args, speculative: bool) -> dict[str, dict]:
    from vllm import LLM

    from vllm_emosteer.quality.evaluate import neutral_prompts

    config = {"method": "ngram", "num_speculative_tokens": args.draft_tokens, "prompt_lookup_max": 3,
              "prompt_lookup_min": 1} if speculative else None
    options = {"vectors": args.vectors} if args.vectors else {}
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024, max_num_seqs=args.requests, seed=0,
              enforce_eager=True, disable_log_stats=False, speculative_config=config,
              additional_config={"emosteer": options})
    tokenizer = llm.get_tokenizer()
    questions = (neutral_prompts() * args.requests)[: args.requests]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    results = {}
    try:
        for name, extras in batches(args.requests, args.seed).items():
            best, drafts = 0.0, {}
            for _ in range(args.repeats):
                tokens_per_s, drafts = run(llm, prompts, extras, args.max_tokens)
                best = max(best, tokens_per_s)
            steps, proposed, accepted = (drafts.get(n, 0) for n in COUNTERS)
            results[name] = {"tokens_per_s": best,
                             "acceptance_rate": accepted / proposed if proposed else None,
                             "acceptance_length": 1 + accepted / steps if steps else None}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return results


def markdown(report: dict) -> str:
    lines = ["| speculation | batch | generated tokens/s | vs plain decoding | acceptance rate | acceptance length |",
             "|---|---|---|---|---|---|"]
    for setting in ("plain", "ngram"):
        for batch, cell in report[setting].items():
            ratio = cell["tokens_per_s"] / report["plain"][batch]["tokens_per_s"]
            rate, length = cell["acceptance_rate"], cell["acceptance_length"]
            lines.append(f"| {setting} | {batch} | {cell['tokens_per_s']:.1f} | {ratio:.2f}x | "
                         f"{'-' if rate is None else f'{rate:.1%}'} | {'-' if length is None else f'{length:.2f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (default: the embedded default model)")
    parser.add_argument("--vectors", help="its vectors file (default: the default model's)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--draft-tokens", type=int, default=3, help="n-gram draft tokens per step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.model is None:
        from vllm_emosteer.default_model import model_path

        args.model = str(model_path())
    report = {"plain": measure(args, speculative=False), "ngram": measure(args, speculative=True),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": args.model,
              "requests": args.requests, "max_tokens": args.max_tokens, "draft_tokens": args.draft_tokens}
    print(json.dumps(report, indent=2) if args.json else markdown(report))


if __name__ == "__main__":
    main()
