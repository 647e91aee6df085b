"""Learned vectors without an engine: training lowers the held-out loss (both objectives), the cached question prefix
equals the full forward, only the engine's "response" positions are steered (never position 0), the file serves
exactly the trained offsets (units "dose"), the metadata, seeding, GGUF export, and bad input."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_emosteer.extraction import learned
from vllm_emosteer.extraction.extract import _prompt_ids
from vllm_emosteer.extraction.learned import LearnedError, Settings, check_settings, gather, train
from vllm_emosteer.extraction.pairs import load_pairs
from vllm_emosteer.vectors.bank import EmotionBank

PAIRS = Path(__file__).parents[1] / "data" / "pirate-pairs.jsonl"  # 8 questions, pirate vs plain answers


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return (AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_llama))


@pytest.fixture(scope="module")
def pairs(tiny):
    training, concepts, source = gather(tiny[1], pairs=load_pairs(PAIRS))
    assert concepts == ["pirate"] and source["data"] == "pairs" and len(training) == 8
    return training


SMALL = dict(steps=8, lr=0.05, cap=1.0, band=(1, 2), pairs_per_step=3, held_out=0.25, evals=1)


@pytest.mark.parametrize("objective", ["bipo", "lm"])
def test_training_lowers_the_held_out_loss(tiny, pairs, objective):
    model, tokenizer = tiny
    before = [p.requires_grad for p in model.parameters()]
    bank = train(model, pairs, ["pirate"], settings=Settings(objective=objective, **SMALL), pad_id=2,
                 model_name="tiny", log=lambda _: None)
    held = bank.recipe["held_out_loss"]
    assert held["loss"] < held["start"] and held["loss"] < held["unsteered"], held
    assert [h["step"] for h in held["history"]] == [0, 4, 8]
    row = bank.recipe["concepts"]["pirate"]
    best = min(held["history"], key=lambda h: h["held_out"])  # kept: the offsets of the best evaluation
    assert row["kept_step"] == best["step"] and held["loss"] == pytest.approx(best["held_out"], abs=1e-6)
    assert row["held_out_pairs"] == 2 and row["train_pairs"] == 6
    assert row["held_out"]["delta_logp_positive"] > 0
    if objective == "bipo":  # two-way: toward the positive answer and away from the negative one
        assert row["held_out"]["delta_logp_negative"] < 0 and held["unsteered"] == pytest.approx(0.693147)
    assert [p.requires_grad for p in model.parameters()] == before and not model.training  # the model as it was


def test_the_file_serves_exactly_the_trained_offsets(tiny, pairs, tmp_path):
    """Units "dose": intensity 1.0 x calibration (the trained dose) x typical norm x unit(EV) is the trained offset;
    raw alpha 1.0 too; one relative dose at every layer, at most the cap."""
    model, _ = tiny
    settings = Settings(**dict(SMALL, steps=3, cap=0.3))
    bank = EmotionBank.load(train(model, pairs, ["pirate"], settings=settings, pad_id=2, model_name="tiny",
                                  data={"data": "pairs"}, log=lambda _: None).save(tmp_path / "l.safetensors"))
    assert bank.units == "dose" and bank.layers == [1, 2] and bank.bands == {"pirate": [1, 2]}
    dose = bank.calibration["pirate"]
    assert 0 < dose <= 0.3 and dose == pytest.approx(bank.recipe["concepts"]["pirate"]["dose"], abs=1e-6)
    served = bank.coefficients({"pirate": 1.0})[:, 0, None] * bank.vectors[:, 0]  # what the engine adds per layer
    torch.testing.assert_close(served, bank.vectors[:, 0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bank.coefficients({"pirate": 1.0}, raw=True)[:, 0], torch.ones(2))
    torch.testing.assert_close(bank.dose_per_alpha()[:, 0], torch.full((2,), dose), rtol=1e-5, atol=0)
    recipe = bank.recipe
    assert recipe["recipe"] == "learned" and recipe["objective"] == "lm" and recipe["band"] == [1, 2]
    assert {k: recipe[k] for k in ("steps", "lr", "cap", "seed", "pairs_per_step", "held_out")} == {
        "steps": 3, "lr": 0.05, "cap": 0.3, "seed": 0, "pairs_per_step": 3, "held_out": 0.25}
    assert recipe["data"] == "pairs" and recipe["prefix_cache"] is True and len(bank.typical_norms) == 2
    json.dumps(recipe)  # the metadata is JSON


def test_cached_prefixes_equal_the_full_forward(tiny, pairs):
    model, _ = tiny
    steering = learned._Steering([model.model.layers[i].self_attn for i in (1, 2)])
    try:
        seqs = [learned._seq(p.context, side, None) for p in pairs[:4] for side in (p.positive, p.negative)]
        seqs.append((tuple(range(100, 108)), 0))  # no question: the first token is the prefix
        offsets = torch.randn(len(seqs), 2, 128, generator=torch.Generator().manual_seed(0))
        results = []
        for extra in (None, offsets):
            full, n_full = learned.answer_logprobs(model, steering, seqs, 2, extra)
            cached, n_cached = learned.answer_logprobs(model, steering, seqs, 2, extra, learned._Prefixes(model))
            torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-4)
            assert torch.equal(n_cached, n_full)
            results.append(full)
        assert (results[0] - results[1]).abs().min() > 1e-3  # the offsets changed every sequence
    finally:
        steering.remove()


def test_only_the_response_positions_are_steered(tiny, pairs):
    """The offset lands on the last question token and every answer token, nowhere else (never position 0, never
    padding), and the loss reads the answer tokens a steered position predicts."""
    assert learned.positions(10, 15) == (9, 10, 10, 15)  # last question token steered; answer scored
    assert learned.positions(0, 6) == (1, 1, 2, 6)  # no question: position 0 stays unsteered
    model, _ = tiny
    seqs = [learned._seq(p.context, p.positive, None) for p in pairs[:3]]
    ids, attention, steer, scored = learned._batch(seqs, 2, "cpu")
    for row, (seq, context_len) in enumerate(seqs):
        expected = torch.zeros(ids.shape[1])
        expected[context_len - 1: len(seq)] = 1
        assert torch.equal(steer[row, :, 0], expected) and steer[row, 0, 0] == 0
        assert scored[row].nonzero()[:, 0].tolist() == list(range(context_len, len(seq)))
    layer = model.model.layers[1].self_attn
    steering = learned._Steering([layer])
    seen = []  # registered after the steering hook, so it sees the steered output
    record = layer.register_forward_hook(lambda m, a, out: seen.append(out[0].detach().clone()))
    offsets = torch.randn(len(seqs), 1, 128, generator=torch.Generator().manual_seed(0))
    try:
        learned.answer_logprobs(model, steering, seqs, 2)
        learned.answer_logprobs(model, steering, seqs, 2, offsets)
    finally:
        steering.remove()
        record.remove()
    torch.testing.assert_close(seen[1] - seen[0], steer * offsets, rtol=1e-5, atol=1e-5)


def test_contrast_pairs_pair_each_emotional_answer_with_the_plain_answer(tiny):
    """The contrast recipe's data: every emotional answer teacher-forced after the plain question, against the plain
    answer to the same question; answers from `generate` (here a stand-in for vLLM)."""
    _, tokenizer = tiny
    asked = []

    def generate(prompts, max_new_tokens, eos):
        asked.extend(prompts)
        assert eos == {2} and max_new_tokens == 5
        return [[100 + i, 101 + i] for i in range(len(prompts))]  # cut at the end-of-sequence token, as vLLM's

    training, concepts, source = gather(tokenizer, emotions=["joy", "fear"], questions=3, filter_pairs=False, seed=1,
                                        generate=generate, max_new_tokens=5, eos={2})
    assert concepts == ["joy", "fear"] and source["data"] == "contrast" and not source["filtered"]
    assert len(asked) == 3 * (1 + 2 * 2)  # a plain answer, and both emotion templates per emotion
    assert len(training) == 3 * 2 * 2 and {p.concept for p in training} == {"joy", "fear"}
    for p in training:
        assert list(p.context) == _prompt_ids(tokenizer, None, p.key)  # after the plain question
        assert p.positive != p.negative and len(p.positive) == 2
    plain = {p.key: p.negative for p in training}
    assert all(p.negative == plain[p.key] for p in training)  # one plain answer per question, for every emotion


def test_keep_last_keeps_the_last_step(tiny, pairs):
    model, _ = tiny
    bank = train(model, pairs, ["pirate"], settings=Settings(**dict(SMALL, steps=4, keep="last")), pad_id=2,
                 log=lambda _: None)
    held = bank.recipe["held_out_loss"]
    assert bank.recipe["concepts"]["pirate"]["kept_step"] == 4 and held["loss"] == held["history"][-1]["held_out"]


def test_seeded(tiny, pairs):
    model, _ = tiny
    run = lambda seed: train(model, pairs, ["pirate"], settings=Settings(**dict(SMALL, steps=2, seed=seed)),  # noqa
                             pad_id=2, log=lambda _: None)
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a.vectors, b.vectors) and a.recipe["held_out_loss"] == b.recipe["held_out_loss"]
    assert not torch.equal(a.vectors, c.vectors)


def test_bfloat16_training(tiny_llama, pairs):
    """The dtype of a GPU run: the model in bfloat16, the offsets learned in float32."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    bank = train(model, pairs, ["pirate"], settings=Settings(**dict(SMALL, steps=3)), pad_id=2, log=lambda _: None)
    assert bank.recipe["dtype"] == "bfloat16" and bank.vectors.dtype == torch.float32
    assert bank.recipe["held_out_loss"]["loss"] < bank.recipe["held_out_loss"]["unsteered"]


def test_residual_file_exports_to_gguf(tiny, pairs, tmp_path):
    from vllm_emosteer.vectors.interop import export_gguf, import_gguf

    model, _ = tiny
    bank = train(model, pairs, ["pirate"], hook="residual", settings=Settings(**dict(SMALL, steps=2)), pad_id=2,
                 log=lambda _: None)
    back = import_gguf(export_gguf(bank, tmp_path / "pirate.gguf"), ["pirate"], {})
    assert back.layers == [1, 2] and torch.allclose(back.vectors, bank.vectors)


@pytest.mark.parametrize("settings, words", [
    (Settings(objective="dpo"), "unknown objective 'dpo'; known: lm, bipo"),
    (Settings(band=(2, 4)), "band [2, 4] is outside the model: it has layers 0-3"),
    (Settings(band=(3, 1)), "band [3, 1] is outside the model"),
    (Settings(cap=0), "cap must be a relative dose"),
    (Settings(steps=0), "steps must be at least 1"),
    (Settings(held_out=1.0), "held-out must be a share in [0, 1)"),
    (Settings(init="zeros"), "unknown init 'zeros'"),
    (Settings(keep="first"), "unknown keep 'first'"),
])
def test_bad_settings_stop_with_one_line(settings, words):
    with pytest.raises(LearnedError) as refused:
        check_settings(settings, 4)
    assert words in str(refused.value) and "\n" not in str(refused.value)


def test_bad_data_stops_with_one_line(tiny, pairs):
    model, tokenizer = tiny
    for data, concepts, words in [([], ["pirate"], "no training pairs"),
                                  (pairs, ["pirate", "formal"], "no usable pairs for ['formal']"),
                                  (pairs[:1], ["pirate"], "has pairs for one question only")]:
        with pytest.raises(LearnedError) as refused:
            train(model, data, concepts, settings=Settings(band=(1, 2)), log=lambda _: None)
        assert words in str(refused.value) and "\n" not in str(refused.value)


def test_prefix_check_falls_back_to_full_sequences(tiny, pairs, monkeypatch):
    """A cache layout the cached path cannot use is found on the first batch; training then runs full sequences."""
    model, _ = tiny

    def broken(self, *args):
        raise RuntimeError("no such cache")

    monkeypatch.setattr(learned._Prefixes, "logprobs", broken)
    said = []
    bank = train(model, pairs, ["pirate"], settings=Settings(**dict(SMALL, steps=2)), pad_id=2, log=said.append)
    assert bank.recipe["prefix_cache"] is False and "training runs the full sequences" in said[0]
