"""The quality metrics and the calibration rule (the sweep itself runs through the engine in `vllm-emosteer eval`)."""

from vllm_emosteer.scores import distinct2
from vllm_emosteer.quality.evaluate import (EvalResult, band_layers, neutral_prompts, prompt_variants,
                                    recommend, sweep_variants)


def test_distinct2_measures_repetition():
    assert distinct2("the cat sat on the mat") == 1.0
    assert distinct2("so scared so scared so scared so scared") == 2 / 7
    assert distinct2("one") == 0.0


def test_neutral_prompts_are_many_and_held_out_from_extraction():
    from vllm_emosteer.extraction.extract import extraction_questions, load_questions

    prompts = neutral_prompts()
    assert len(prompts) >= 60 and len(set(prompts)) == len(prompts)
    assert not set(prompts) & {q for qs in load_questions().values() for q in qs}
    assert len(set(extraction_questions())) == 100 and not set(prompts) & set(extraction_questions())


def test_sweep_steers_plain_values_on_bands_and_skips_zero():
    variants = sweep_variants(["joy", "fear"], [-1, 0, 2], bands=[(20, 29)])
    assert [v.label for v in variants] == ["unsteered", "joy -1 L20-29", "joy 2 L20-29", "fear -1 L20-29",
                                           "fear 2 L20-29"]
    assert variants[2].extra_args == {"emosteer": {"emotions": {"joy": 2}, "positions": "response", "raw": False,
                                                   "layers": [20, 29]}}
    assert variants[2].band == (20, 29)


def test_bands_are_fractions_of_depth():
    assert band_layers("middle third", 30) == (10, 19)
    assert band_layers("30-70%", 30) == (9, 20)
    assert band_layers("all", 30) == (0, 29)


def test_prompting_baseline_asks_for_the_emotion_in_the_user_turn():
    (variant,) = prompt_variants(["anger"])
    assert variant.extra_args is None and variant.group == "prompt"
    assert variant.template.format(question="How was lunch?") == (
        "Answer as someone who is extremely angry and furious right now. How was lunch?")


def test_recommend_needs_both_scorers_and_coherence():
    def row(alpha, nade, minilm, distinct, topic, ppl=3.0, band=(10, 19)):
        return {"label": f"joy {alpha}", "group": "sweep", "emotions": ["joy"], "alpha": alpha, "band": list(band),
                "hit_nade": nade, "hit_minilm": minilm, "distinct2": distinct, "topic": topic, "ppl": ppl}

    base = {"label": "unsteered", "group": "sweep", "emotions": [], "alpha": 0.0, "ppl": 2.0}
    rows = [base, row(0.1, 0.3, 0.3, 0.9, 0.5), row(0.2, 0.6, 0.6, 0.8, 0.4),
            row(0.2, 0.9, 0.2, 0.8, 0.4, band=(0, 29)),
            row(0.3, 0.7, 0.7, 0.8, 0.4, ppl=9.0), row(0.45, 0.9, 0.9, 0.5, 0.4), row(0.6, 1.0, 1.0, 0.7, 0.1)]
    # 0.3 is too disfluent, 0.45 repeats, 0.6 is off topic; on the all-layer band the scorers disagree
    assert recommend(EvalResult(rows), ["joy"]) == {"joy": {"value": 0.2, "band": [10, 19]}}
    assert recommend(EvalResult([base, row(0.45, 0.9, 0.9, 0.5, 0.4)]), ["joy"]) == {"joy": None}


def test_eval_of_an_uncalibrated_file_says_why_it_has_no_steered_rows():
    from vllm_emosteer.quality.evaluate import calibrated_rows

    variants, why = calibrated_rows({}, ["joy", "fear"], 1.0, "mine.safetensors")
    assert variants == [] and "mine.safetensors has no calibration" in why
    assert "vllm-emosteer calibrate --vectors mine.safetensors" in why and "--doses" in why
    variants, why = calibrated_rows({"joy": 0.3, "fear": 0.2}, ["joy", "fear"], 1.5, "mine.safetensors")
    assert [v.label for v in variants] == ["joy 1.5", "fear 1.5"] and why is None
