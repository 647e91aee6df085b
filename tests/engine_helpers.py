"""Helpers shared by the engine tests."""

import gc
import random

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

TINY_ENGINE = dict(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                   enforce_eager=True, seed=0, block_size=32)


def tiny_llm(model_dir, vectors=None, emosteer=True, options=None, **overrides):
    kwargs = dict(TINY_ENGINE, **overrides)
    if emosteer:
        kwargs["additional_config"] = {"emosteer": dict({"vectors": str(vectors)} if vectors else {}, **(options or {}))}
    return LLM(model=str(model_dir), **kwargs)


def shutdown(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def prompt(length, seed, vocab_size=40000):
    rng = random.Random(seed)
    return TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab_size) for _ in range(length)])


def params(extra=None, max_tokens=8, logprobs=1):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=logprobs, extra_args=extra)


def tokens_and_logprobs(output):
    out = output.outputs[0]
    return out.token_ids, [lp[tok].logprob for tok, lp in zip(out.token_ids, out.logprobs)]
