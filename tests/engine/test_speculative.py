"""Speculative decoding steered exactly: with n-gram drafts, every row of a batch that mixes unsteered and steered
requests ("response" and "all" positions, one emotion and a mix) generates the same greedy tokens as the same batch
without speculation, while drafts were proposed and accepted (so the verify steps really ran steered)."""

import pytest
from conftest import RUNNER
from engine_helpers import shutdown, tiny_llm
from vllm import SamplingParams

from vllm_emosteer import steer

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
QUESTIONS = ["Repeat after me three times: the cat sat on the mat.", "List the days of the week, twice.",
             "Count from one to twenty in words."]
STEERING = [None, steer(joy=1.0), steer(sadness=1.5, positions="all"), steer(fear=0.8, joy=0.4)]
MAX_TOKENS = 32 if RUNNER == "v1" else 12  # Model Runner V2 runs through Triton's interpreter here: slow


def greedy_tokens(model_dir, **engine_args):
    llm = tiny_llm(model_dir, max_model_len=512, max_num_batched_tokens=512, max_num_seqs=16,
                   disable_log_stats=False, **engine_args)
    try:
        tokenizer = llm.get_tokenizer()
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True) for q in QUESTIONS for _ in STEERING]
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, extra_args=extra)
                  for _ in QUESTIONS for extra in STEERING]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        accepted = sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_accepted_tokens")
        return [list(o.outputs[0].token_ids) for o in outputs], accepted
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def plain_and_speculative(default_model_dir):
    return greedy_tokens(default_model_dir), greedy_tokens(default_model_dir, speculative_config=NGRAM)


def test_speculative_decoding_generates_what_plain_decoding_does_row_by_row(plain_and_speculative):
    (plain, _), (speculative, accepted) = plain_and_speculative
    assert accepted > 0, "no draft token was accepted: the test did not exercise speculation"
    for row, (without, with_drafts) in enumerate(zip(plain, speculative)):
        question, steering = divmod(row, len(STEERING))
        assert with_drafts == without, f"question {question}, steering {STEERING[steering]}"


def test_the_steered_rows_were_steered(plain_and_speculative):
    (_, _), (speculative, _) = plain_and_speculative
    rows = [speculative[q * len(STEERING):(q + 1) * len(STEERING)] for q in range(len(QUESTIONS))]
    for column in range(1, len(STEERING)):  # each steering changed at least one answer (copying may not change)
        assert any(answers[column] != answers[0] for answers in rows), f"steering {STEERING[column]}"
