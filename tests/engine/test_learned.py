"""Learned vectors through the real engine: a file trained in transformers on the tiny Llama, served as a vector set,
raises the teacher-forced log-probability of the positive answers and lowers the negative ones' (exact numbers:
the engine's prompt logprobs equal transformers' with the same offsets); steering at the engine's "response"
positions gives what training computed for the same answer; intensity 0 is bit-identical to unsteered; the
command line trains from answers vLLM writes and refuses bad input with one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import params, shutdown, tiny_llm, tokens_and_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_emosteer import steer
from vllm_emosteer.extraction import learned
from vllm_emosteer.extraction.learned import Settings, gather, split, train
from vllm_emosteer.extraction.pairs import load_pairs
from vllm_emosteer.vectors.bank import EmotionBank

PAIRS = Path(__file__).parents[1] / "data" / "pirate-pairs.jsonl"  # 8 questions, pirate vs plain answers
SETTINGS = Settings(objective="bipo", steps=10, lr=0.05, cap=0.8, band=(1, 2), pairs_per_step=3, held_out=0.25,
                    evals=0)
STYLE = "style/pirate"  # the learned file is served as the vector set "style", beside the tiny emotion bank


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "vllm_emosteer.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    pairs, _, _ = gather(tokenizer, pairs=load_pairs(PAIRS))
    bank = train(model, pairs, ["pirate"], settings=SETTINGS, pad_id=2, model_name="tiny", log=lambda _: None)
    path = bank.save(tmp_path_factory.mktemp("learned") / "pirate.safetensors")
    _, held = split(pairs, ["pirate"], SETTINGS.held_out, SETTINGS.seed)  # the split training used
    return model, EmotionBank.load(path), path, pairs, held


def test_command_line_trains_from_vllm_answers_and_refuses_bad_input(tiny_llama, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    questions = [pair.question for pair in load_pairs(PAIRS)[:4]]
    pairs.write_text("\n".join(json.dumps({"concept": "formal", "question": q, "positive": "Answer very formally.",
                                           "negative": "Answer casually."}) for q in questions) + "\n")
    out = tmp_path / "formal.safetensors"
    done = cli("extract", "--recipe", "learned", "--pairs", pairs, "--model", tiny_llama, "--max-new-tokens", 4,
               "--steps", 3, "--layers", 1, 2, "--objective", "bipo", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| formal |" in done.stdout and "held-out loss" in done.stdout and "--layers 1 2" in done.stdout
    bank = EmotionBank.load(out)
    assert bank.recipe["recipe"] == "learned" and bank.recipe["objective"] == "bipo"
    assert bank.recipe["decoding"] == "greedy (vLLM)" and bank.recipe["pairs_file"] == "pairs.jsonl"
    assert bank.layers == [1, 2] and bank.units == "dose" and "steps" in bank.recipe
    info = json.loads(cli("inspect", out, "--json").stdout)
    assert info["recipe"]["recipe"] == "learned"

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for args, words in [(["--pairs", empty], "no pairs"),
                        (["--pairs", pairs, "--layers", 2, 7], "band [2, 7] is outside the model"),
                        (["--pairs", pairs, "--objective", "dpo"], "unknown objective 'dpo'")]:
        bad = cli("extract", "--recipe", "learned", "--model", tiny_llama, "--out", tmp_path / "no.safetensors",
                  *args, timeout=300)
        lines = [line for line in bad.stderr.splitlines() if line.strip()]
        assert bad.returncode == 2 and len(lines) == 1 and words in lines[0], bad.stderr[-1500:]
    wrong = cli("extract", "--steps", 3, "--out", tmp_path / "no.safetensors", timeout=300)
    assert wrong.returncode == 2 and "--steps: only with --recipe learned" in wrong.stderr
    assert not (tmp_path / "no.safetensors").exists()


@pytest.fixture(scope="module")
def llm(tiny_llama, tiny_bank_path, trained):
    engine = tiny_llm(tiny_llama, options={"vectors": {"emotions": str(tiny_bank_path), "style": str(trained[2])}})
    yield engine
    shutdown(engine)


def offsets_of(bank):
    """Per model layer, what intensity 1.0 adds (the bank's own rule)."""
    served = bank.coefficients({"pirate": 1.0})[:, 0, None] * bank.vectors[:, 0]
    return dict(zip(bank.layers, served))


def reference_logprobs(model, ids, offsets, first):
    """Per token t >= 1, log p(ids[t]) in transformers, the offsets added to the attention output of their layers
    from position `first` on (an independent reference: plain hooks, one unpadded sequence)."""
    handles = []
    for layer, offset in (offsets or {}).items():
        def hook(_module, _args, out, offset=offset):
            mask = (torch.arange(out[0].shape[1]) >= first).float()[None, :, None]
            return (out[0] + mask * offset, *out[1:])
        handles.append(model.model.layers[layer].self_attn.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    finally:
        for handle in handles:
            handle.remove()
    lp = logits.log_softmax(-1)
    return torch.tensor([float(lp[t - 1, ids[t]]) for t in range(1, len(ids))], dtype=torch.float64)


def engine_prompt_logprobs(llm, seqs, extra):
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in seqs],
                           SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, extra_args=extra),
                           use_tqdm=False)
    return [torch.tensor([lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], s[1:])], dtype=torch.float64)
            for o, s in zip(outputs, seqs)]


def test_served_file_raises_the_positive_answers_and_lowers_the_negative(llm, trained):
    """Teacher-forced through the engine (prompt logprobs; positions "all", the only mode that steers prompt
    tokens): per answer, the sum of its tokens' log-probabilities, steered at intensity 1.0 against unsteered."""
    model, bank, _, pairs, held = trained
    seqs = [p.context + side for p in pairs for side in (p.positive, p.negative)]
    plain = engine_prompt_logprobs(llm, seqs, None)
    steered = engine_prompt_logprobs(llm, seqs, steer(positions="all", **{STYLE: 1.0}))
    for i, (p, seq) in enumerate(zip([p for p in pairs for _ in range(2)], seqs)):
        # exact: the engine's numbers are transformers' with the file's offsets on every position
        torch.testing.assert_close(plain[i], reference_logprobs(model, seq, None, 0), rtol=0, atol=2e-4)
        torch.testing.assert_close(steered[i], reference_logprobs(model, seq, offsets_of(bank), 0), rtol=0, atol=2e-4)
    answer = lambda values, p: float(values[len(p.context) - 1:].sum())  # noqa: E731  the answer tokens
    rows = [(p in held, answer(steered[2 * i], p) - answer(plain[2 * i], p),
             answer(steered[2 * i + 1], p) - answer(plain[2 * i + 1], p)) for i, p in enumerate(pairs)]
    assert sum(h for h, _, _ in rows) == 2
    for is_held, positive, negative in rows:  # held-out and training pairs alike
        assert positive > 0.5 and negative < -0.5, rows


def test_response_steering_serves_what_training_computed(llm, trained):
    """The engine's own positions ("response": the last prompt token and every generated token): the log-probabilities
    of a steered greedy answer are what the training code computes for that answer with the trained offsets."""
    model, bank, _, pairs, _ = trained
    steering = learned._Steering([model.model.layers[i].self_attn for i in bank.layers])
    offsets = torch.stack([bank.vectors[:, 0]])[:, :, :]  # [1 row, band layers, H]: the trained offsets
    try:
        for p in pairs[:3]:
            out = llm.generate(TokensPrompt(prompt_token_ids=list(p.context)),
                               params(steer(**{STYLE: 1.0}), max_tokens=6), use_tqdm=False)[0]
            tokens, logprobs = tokens_and_logprobs(out)
            seq = p.context + tuple(tokens)
            expected = reference_logprobs(model, seq, offsets_of(bank), len(p.context) - 1)[len(p.context) - 1:]
            torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), expected, rtol=0, atol=2e-4)
            trained_sum, count = learned.answer_logprobs(model, steering, [(seq, len(p.context))], 2, offsets)
            assert count.item() == 6 and abs(trained_sum.item() - sum(logprobs)) < 1e-3
            unsteered = llm.generate(TokensPrompt(prompt_token_ids=list(p.context)), params(None, max_tokens=6),
                                     use_tqdm=False)[0]
            assert tokens_and_logprobs(unsteered)[1] != logprobs
    finally:
        steering.remove()


def test_intensity_zero_is_bit_identical_to_unsteered(llm, trained):
    _, _, _, pairs, _ = trained
    prompts = [TokensPrompt(prompt_token_ids=list(p.context + p.positive)) for p in pairs[:3]]
    runs = []
    for extra in (None, steer(**{STYLE: 0.0}), steer(positions="all", **{STYLE: 0.0})):
        outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1,
                                                    prompt_logprobs=0, extra_args=extra), use_tqdm=False)
        runs.append([(tokens_and_logprobs(o), [d and {k: v.logprob for k, v in d.items()} for d in o.prompt_logprobs])
                     for o in outs])
    assert runs[0] == runs[1] == runs[2]
