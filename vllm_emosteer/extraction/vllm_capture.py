"""Extraction inside vLLM: one engine in capture mode answers the questions and captures the activations.

The model is never loaded in transformers, so the same command extracts wherever vLLM can serve the model
(tensor and pipeline parallel included: `engine_args` go to `LLM`). What it captures equals the transformers
capture (`extract.mean_activations`) to float tolerance: the same positions, the same per-answer mean.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..engine.capture_request import CAPTURE_KEY
from ..engine.vllm_internals import TAKE_CAPTURES_RPC


class VllmExtractor:
    """`generate` and `capture` for `extract`, on one vLLM engine started in capture mode."""

    def __init__(self, model: str, hook: str, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
                 **engine_args):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB on the CPU backend (else most of the RAM)
        from transformers import AutoConfig
        from vllm import LLM

        self.config = AutoConfig.from_pretrained(model)
        longest = getattr(self.config.get_text_config(), "max_position_embeddings", None) or 2048
        max_model_len = max_model_len or min(2048, longest)  # questions and answers are short
        self.llm = LLM(model=model, dtype=dtype, seed=seed, enforce_eager=True, enable_prefix_caching=False,
                       max_model_len=max_model_len, additional_config={"emosteer": {"capture": hook}}, **engine_args)
        self.dtype = str(self.llm.llm_engine.vllm_config.model_config.dtype).replace("torch.", "")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos: set[int]) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                    SamplingParams(max_tokens=max_new_tokens, temperature=0), use_tqdm=True)
        answers = [list(o.outputs[0].token_ids) for o in outputs]
        return [a[: next((i for i, t in enumerate(a) if t in eos), len(a))] for a in answers]

    def capture(self, samples, hook: str, batch_size: int, bar) -> tuple[torch.Tensor, list[float]]:
        """Per sample, the mean hooked activation over the last context token and the answer tokens (never
        position 0) at every layer ([N, L, H] float64), and per layer the median token norm over the answers."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for i, s in enumerate(samples):
            prompts.append(TokensPrompt(prompt_token_ids=s.context + s.answer_ids))
            params.append(SamplingParams(max_tokens=1, temperature=0, extra_args={CAPTURE_KEY: {
                "key": str(i), "from": max(len(s.context) - 1, 1), "norms_from": max(len(s.context), 1)}}))
        self.llm.generate(prompts, params, use_tqdm=True)
        bar.update(bar.total - bar.n)
        return merge_captures(self.llm.collective_rpc(TAKE_CAPTURES_RPC), len(samples),
                              int(self.config.get_text_config().num_hidden_layers),
                              int(self.config.get_text_config().hidden_size))

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def merge_captures(per_worker: list[dict], count: int, num_layers: int, hidden_size: int):
    """Each worker's captures (its own layers; pipeline stages hold different ones) into means and norms."""
    means = torch.zeros(count, num_layers, hidden_size, dtype=torch.float64)
    norms: list[list[np.ndarray]] = [[] for _ in range(num_layers)]
    seen = np.zeros((count, num_layers), dtype=bool)
    for captures in per_worker:
        for key, item in captures.items():
            i, rows = int(key), item["rows"]
            sums = np.frombuffer(item["sums"], dtype=np.float32).reshape(len(rows), hidden_size)
            means[i, rows] = torch.from_numpy(sums.astype(np.float64)) / item["count"]
            seen[i, rows] = True
            for row, raw in zip(rows, item["norms"]):
                norms[row].append(np.frombuffer(raw, dtype=np.float32))
    if not seen.all():
        missing = np.argwhere(~seen)[0]
        raise RuntimeError(f"emosteer: no capture came back for sample {missing[0]} at layer {missing[1]}")
    typical = [float(torch.from_numpy(np.concatenate(n)).median()) for n in norms]  # the lower median, as torch
    return means, typical
