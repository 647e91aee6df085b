"""Extraction of the default model's vectors: the capture inside vLLM vs in transformers, timed in one run.

Both capture the same samples (the contrast recipe's questions, answered once through vLLM, no pair filter), at
the attn_out hook, in fp32 on CPU; the script checks that the two give the same vectors and prints the times.
The answers are generated once and shared, so only the capture differs; `--full` also times the generation
of the whole recipe both ways (transformers' generate is the slow part on CPU).

    python benchmarks/extraction.py [--questions 20] [--full] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=20, help="questions (x 5 emotions x 2 placements + 1)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--full", action="store_true", help="also time the generation, vLLM vs transformers")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_emosteer.default_model import model_path
    from vllm_emosteer.emotions import EMOTIONS
    from vllm_emosteer.extraction.extract import (CONTRAST_TEMPLATES, _contrast_samples, extraction_questions,
                                               generate_answers, mean_activations)
    from vllm_emosteer.extraction.vllm_capture import VllmExtractor

    model = str(model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    samples = _contrast_samples(tokenizer, EMOTIONS, extraction_questions()[: args.questions], CONTRAST_TEMPLATES)
    prompts = [s.prompt_ids for s in samples]
    eos = {tokenizer.eos_token_id}
    times = {}

    engine = VllmExtractor(model, "attn_out", dtype="float32")
    try:
        start = time.perf_counter()
        answers = engine.generate(prompts, args.max_new_tokens, eos)
        times["generate_vllm_s"] = time.perf_counter() - start
        for sample, answer in zip(samples, answers):
            sample.answer_ids = answer or [tokenizer.eos_token_id]
        start = time.perf_counter()
        vllm_means, vllm_norms = engine.capture(samples, "attn_out", args.batch_size, tqdm(total=1, disable=True))
        times["capture_vllm_s"] = time.perf_counter() - start
    finally:
        engine.shutdown()

    hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    start = time.perf_counter()
    with tqdm(total=-(-len(samples) // args.batch_size), desc="transformers capture", file=sys.stderr) as bar:
        hf_means, hf_norms = mean_activations(hf_model, samples, "attn_out", args.batch_size, bar)
    times["capture_transformers_s"] = time.perf_counter() - start
    if args.full:
        start = time.perf_counter()
        with tqdm(total=-(-len(prompts) // args.batch_size), desc="transformers generate", file=sys.stderr) as bar:
            generate_answers(hf_model, tokenizer, prompts, args.max_new_tokens, args.batch_size, bar)
        times["generate_transformers_s"] = time.perf_counter() - start

    vectors = lambda means: means[[i for i, s in enumerate(samples) if s.condition == "emotional"]].mean(0)  # noqa
    difference = float((vectors(vllm_means) - vectors(hf_means)).norm() / vectors(hf_means).norm())
    result = {"samples": len(samples), "tokens": sum(len(s.context) + len(s.answer_ids) for s in samples),
              **{k: round(v, 2) for k, v in times.items()},
              "capture_speedup": round(times["capture_transformers_s"] / times["capture_vllm_s"], 2),
              "relative_difference_of_the_means": difference}
    if args.full:
        result["total_speedup"] = round((times["generate_transformers_s"] + times["capture_transformers_s"])
                                        / (times["generate_vllm_s"] + times["capture_vllm_s"]), 2)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0 if difference < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
