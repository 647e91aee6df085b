"""Your own concepts: pairs files, their errors, the consistency signal, and steering with the result."""

import json
import os
import subprocess
import sys

import pytest
import torch
from engine_helpers import params, prompt, shutdown, tiny_llm

from vllm_emosteer import steer
from vllm_emosteer.vectors.bank import EmotionBank
from vllm_emosteer.extraction.extract import Sample, consistency
from vllm_emosteer.extraction.pairs import PairsError, load_pairs

GOOD = [
    {"concept": "formal", "question": "How do I boil an egg?", "positive": "Answer in a very formal register.",
     "negative": "Answer casually."},
    {"concept": "formal", "question": "What is rain?", "positive": "Answer in a very formal register.",
     "negative": "Answer casually."},
    {"concept": "pirate", "positive_text": "Arr, matey, the sea be calm today.", "negative_text": "The sea is calm."},
    {"concept": "pirate", "question": "How is the weather?", "positive_text": "Arr, fair winds, me hearty!",
     "negative_text": "The weather is fine."},
]


def write(path, items):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in items) + "\n")
    return path


@pytest.mark.parametrize("bad, words", [
    ({"question": "q", "positive": "p", "negative": "n"}, "line 2: missing 'concept'"),
    ({"concept": "formal", "question": "q", "positive": "p"}, "line 2: missing 'negative'"),
    ({"concept": "pirate", "positive_text": "Arr"}, "line 2: missing 'negative_text'"),
    ({"concept": "formal", "question": "q", "positive": " ", "negative": "n"}, "line 2: 'positive' must be a non-empty"),
    ({"concept": "Formal!", "positive_text": "a", "negative_text": "b"}, "line 2: concept 'Formal!' must be"),
    ({"concept": "formal", "question": "q", "positive": "p", "negative": "n", "tone": "x"}, "unknown field(s) ['tone']"),
    ({"concept": "formal", "positive": "p", "negative": "n", "positive_text": "a", "negative_text": "b"}, "not both"),
    ({"concept": "for-mal", "positive_text": "a", "negative_text": "b"}, "line 2: concept 'for-mal' duplicates"),
    ("{not json", "line 2: not a JSON object"),
    (GOOD[0], "line 2: the same pair is given twice"),
])
def test_bad_pairs_files_name_the_line_and_field(tmp_path, bad, words):
    items = [{"concept": "for_mal", "positive_text": "a b c", "negative_text": "d e f"} if "duplicates" in words
             else GOOD[0], bad]
    with pytest.raises(PairsError) as refused:
        load_pairs(write(tmp_path / "p.jsonl", items))
    assert words in str(refused.value)


def test_consistency_is_the_mean_pairwise_cosine_of_differences():
    def samples_for(diffs):
        means, samples = [], []
        for i, d in enumerate(diffs):
            means += [torch.zeros(3, 4, dtype=torch.float64), d]
            samples += [Sample("c", "neutral", f"q{i}", [1], [2], kept_for=("c",)),
                        Sample("c", "emotional", f"q{i}", [1], [2], kept_for=("c",))]
        return torch.stack(means), samples

    same = torch.ones(3, 4, dtype=torch.float64)
    assert consistency(*samples_for([same, 2 * same, 3 * same]), ["c"])["c"] == {"0-0": 1.0, "1-1": 1.0, "2-2": 1.0}
    means, samples = samples_for([same, -same])
    assert consistency(means, samples, ["c"])["c"]["1-1"] == -1.0
    assert consistency(*samples_for([same]), ["c"])["c"]["0-0"] is None


def test_extract_pairs_then_steer_with_the_result(tmp_path, tiny_llama):
    pairs = write(tmp_path / "pairs.jsonl", GOOD)
    out = tmp_path / "mine.safetensors"
    result = subprocess.run([sys.executable, "-m", "vllm_emosteer.cli", "extract", "--pairs", pairs, "--model",
                             tiny_llama, "--max-new-tokens", "4", "--out", out],  # inside vLLM (the default)
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| formal |" in result.stdout and "| pirate |" in result.stdout and "consistency" in result.stdout
    bank = EmotionBank.load(out)
    assert bank.emotions == ["formal", "pirate"] and bank.units == "dose" and bank.recipe["recipe"] == "pairs"
    assert set(bank.recipe["consistency"]) == {"formal", "pirate"} and bank.recipe["capture"] == "vLLM (capture mode)"

    cannot = subprocess.run([sys.executable, "-m", "vllm_emosteer.cli", "extract", "--pairs", pairs, "--model",
                             tiny_llama, "--tensor-parallel-size", "3", "--out", tmp_path / "no.safetensors"],
                            capture_output=True, text=True, timeout=300)
    assert cannot.returncode == 1 and "vLLM cannot capture" in cannot.stderr, cannot.stderr[-1500:]
    assert not (tmp_path / "no.safetensors").exists()

    bad = subprocess.run([sys.executable, "-m", "vllm_emosteer.cli", "extract", "--pairs",
                          write(tmp_path / "bad.jsonl", [GOOD[0], {"concept": "x"}]), "--model", tiny_llama,
                          "--out", tmp_path / "bad.safetensors"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "bad.jsonl line 2: missing 'question'" in bad.stderr
    assert not (tmp_path / "bad.safetensors").exists()

    llm = tiny_llm(tiny_llama, out, options={"max_dose": 100.0})
    try:
        outputs = llm.generate([prompt(20, 5)] * 3, [params(None), params(steer(formal=1.0)),
                                                     params(steer(pirate=1.0, formal=-0.5))])
        tokens = [tuple(o.outputs[0].token_ids) for o in outputs]
        assert len(set(tokens)) == 3
    finally:
        shutdown(llm)


def test_eval_prototypes_errors(tmp_path):
    """`eval --prototypes` scoring is tested in test_quality.py (shared engine); here its bad input."""
    for content, words in [({"pirate": ["Arr"]}, "--prototypes names ['pirate'], not in the vectors file"),
                           ({"joy": []}, "non-empty lists"), (["joy"], "JSON object")]:
        bad = subprocess.run([sys.executable, "-m", "vllm_emosteer.cli", "eval", "--prototypes",
                              write(tmp_path / "bad.json", [json.dumps(content)])],
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and words in bad.stderr, bad.stderr[-500:]
