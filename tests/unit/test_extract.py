"""Extraction equals a reference computed one sample at a time from transformers' own activations."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_emosteer.extraction.extract import extract


def reference_vectors(model, samples, emotions, hook):
    """Unbatched, unpadded: o_proj output (attn_out) or output_hidden_states (residual)."""
    layers = model.model.layers
    per_sample = []
    for s in samples:
        ids = torch.tensor([s.context + s.answer_ids])
        captured = {}
        handles = [layer.self_attn.o_proj.register_forward_hook(
            lambda m, a, out, i=i: captured.__setitem__(i, out[0])) for i, layer in enumerate(layers)]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        for h in handles:
            h.remove()
        first, end = max(len(s.context) - 1, 1), len(s.context) + len(s.answer_ids)
        if hook == "attn_out":
            acts = [captured[i][first:end].double().mean(0) for i in range(len(layers))]
        else:
            acts = [out.hidden_states[i + 1][0, first:end].double().mean(0) for i in range(len(layers))]
        per_sample.append(torch.stack(acts))
    per_sample = torch.stack(per_sample)
    rows = []
    for e in emotions:
        emo = [i for i, s in enumerate(samples) if s.condition == "emotional" and e in s.kept_for]
        neu = [i for i, s in enumerate(samples) if s.condition == "neutral" and e in s.kept_for]
        rows.append(per_sample[emo].mean(0) - per_sample[neu].mean(0))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("hook, recipe", [("attn_out", "paper"), ("residual", "paper"), ("attn_out", "contrast")])
def test_extract_matches_reference(tiny_llama, hook, recipe):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    emotions = ["joy", "fear"]
    bank, samples = extract(model, tokenizer, emotions=emotions, recipe=recipe, questions_per_emotion=3, hook=hook,
                            max_new_tokens=6, batch_size=4, seed=3, filter_pairs=False)
    assert list(bank.vectors.shape) == [4, 2, 128]
    assert bank.hook == hook and bank.emotions == emotions
    assert bank.model["architecture"] == "LlamaForCausalLM" and bank.model["num_layers"] == 4
    assert bank.recipe["questions_per_emotion"] == 3 and bank.recipe["seed"] == 3
    assert bank.units == ("dose" if recipe == "contrast" else "alpha") and len(bank.typical_norms) == 4
    if recipe == "contrast":  # emotional answers are teacher-forced after the plain question, not their own prompt
        emotional = [s for s in samples if s.condition == "emotional"]
        assert all(s.context_ids is not None and s.context_ids != s.prompt_ids for s in emotional)
        assert {len(s.kept_for) for s in samples if s.condition == "neutral"} == {2}  # shared by both emotions
    # prompts differ in length, so the batches really were padded
    assert len({len(s.prompt_ids) for s in samples}) > 1
    expected = reference_vectors(model, samples, emotions, hook)
    layers = slice(None) if hook == "attn_out" else slice(0, 3)  # HF's last hidden state is after the final norm
    assert torch.allclose(bank.vectors[layers].double(), expected[layers], rtol=1e-4, atol=1e-5)
    assert bank.vectors.abs().sum() > 0


def test_extract_is_seeded(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    kwargs = dict(emotions=["anger"], recipe="paper", questions_per_emotion=2, max_new_tokens=3, batch_size=4)
    a, sa = extract(model, tokenizer, seed=5, **kwargs)
    b, sb = extract(model, tokenizer, seed=5, **kwargs)
    c, sc = extract(model, tokenizer, seed=6, **kwargs)
    assert torch.equal(a.vectors, b.vectors)
    assert [s.question for s in sa] == [s.question for s in sb] != [s.question for s in sc]


def test_select_pairs_keeps_answers_that_read_as_their_emotion():
    from vllm_emosteer.extraction.extract import Sample, select_pairs

    def sample(emotion, condition, text):
        return Sample(emotion, condition, "q", [1], [2], text=text,
                      kept_for=(emotion,) if emotion else ("joy", "sadness"))

    samples = [
        sample("joy", "emotional", "I am so happy and delighted today, what a wonderful, joyful morning!"),
        sample("joy", "emotional", "The meeting is at three in room four."),  # does not read as joy
        sample("sadness", "emotional", "I feel so sad and heartbroken, everything is empty and lonely."),
        sample("sadness", "emotional", "sad sad sad sad sad sad sad sad"),  # loops
        sample(None, "neutral", "The report lists the opening hours of the library."),  # both: joy
        sample(None, "neutral", "I feel so sad and heartbroken today."),  # reads as sadness: not a neutral for it
    ]
    table = select_pairs(samples, ["joy", "sadness"])
    assert [s.kept_for for s in samples[:4]] == [("joy",), (), ("sadness",), ()]
    assert samples[4].kept_for == ("sadness",) and samples[5].kept_for == ("joy",)
    assert table["joy"]["emotional_kept"] == 1 and table["sadness"]["neutral_kept"] == 1
    with pytest.raises(ValueError, match="no usable contrast for joy"):
        select_pairs([sample("joy", "emotional", "The bus leaves at eight."), samples[4]], ["joy"])


def test_select_pairs_can_leave_out_an_emotion_without_a_contrast():
    from vllm_emosteer.extraction.extract import Sample, select_pairs

    samples = [Sample("joy", "emotional", "q", [1], [2], text="The bus leaves at eight.", kept_for=("joy",)),
               Sample("fear", "emotional", "q", [1], [2], kept_for=("fear",),
                      text="I am so scared and terrified, my hands are shaking with fear."),
               Sample(None, "neutral", "q", [1], [2], text="The report lists the opening hours of the library.",
                      kept_for=("joy", "fear"))]
    with pytest.raises(ValueError, match="no usable contrast for joy.*--skip-missing"):
        select_pairs(samples, ["joy", "fear"])
    table = select_pairs(samples, ["joy", "fear"], skip_missing=True)
    assert table["joy"]["left_out"] and not table["fear"]["left_out"]
    assert [s.kept_for for s in samples] == [(), ("fear",), ("fear",)]
    with pytest.raises(ValueError, match="no usable contrast for any of"):
        select_pairs(samples[:1] + samples[2:], ["joy"], skip_missing=True)


def test_extract_skip_missing_writes_the_emotions_that_have_a_contrast(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    texts = {"scared": "I am so scared and terrified, my hands are shaking with fear.",
             "disgusted": "The bus leaves at eight."}  # no disgust: the scorers never read it as disgust

    def generate(prompts, max_new_tokens, eos):
        decoded = [tokenizer.decode(p) for p in prompts]
        answers = [next((t for word, t in texts.items() if word in d), "The report lists the opening hours.")
                   for d in decoded]
        return [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]

    kwargs = dict(emotions=["fear", "disgust"], questions_per_emotion=2, max_new_tokens=4, generate=generate)
    with pytest.raises(ValueError, match="no usable contrast for disgust"):
        extract(model, tokenizer, **kwargs)
    bank, samples = extract(model, tokenizer, skip_missing=True, **kwargs)
    assert bank.emotions == ["fear"] and bank.vectors.shape[1] == 1
    assert bank.recipe["left_out"] == ["disgust"] and bank.recipe["contrast"]["disgust"]["left_out"]
    assert all("disgust" not in s.kept_for for s in samples)
