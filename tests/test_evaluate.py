"""The quality metrics and the calibration rule (the sweep itself runs through the engine in `vllm-emosteer eval`)."""

from vllm_emosteer.evaluate import EvalResult, distinct2, neutral_prompts, recommend, sweep_variants


def test_distinct2_measures_repetition():
    assert distinct2("the cat sat on the mat") == 1.0
    assert distinct2("so scared so scared so scared so scared") == 2 / 7
    assert distinct2("one") == 0.0


def test_neutral_prompts_are_many_and_not_emotionquery():
    from vllm_emosteer.extract import load_questions

    prompts = neutral_prompts()
    assert len(prompts) >= 60 and len(set(prompts)) == len(prompts)
    assert not set(prompts) & {q for qs in load_questions().values() for q in qs}


def test_sweep_uses_raw_alphas_and_skips_zero():
    variants = sweep_variants(["joy", "fear"], [-1, 0, 2], layers=(20, 29))
    assert [v.label for v in variants] == ["unsteered", "joy -1", "joy 2", "fear -1", "fear 2"]
    assert variants[2].extra_args == {"emosteer": {"emotions": {"joy": 2}, "positions": "response", "raw": True,
                                                   "layers": [20, 29]}}


def test_recommend_picks_the_best_coherent_alpha():
    def row(alpha, hit, distinct, topic, ppl=3.0):
        return {"label": f"joy {alpha}", "group": "sweep", "emotions": ["joy"], "alpha": alpha, "hit": hit,
                "target": hit, "distinct2": distinct, "topic": topic, "ppl": ppl}

    base = {"label": "unsteered", "group": "sweep", "emotions": [], "alpha": 0.0, "ppl": 2.0}
    result = EvalResult([base, row(0.5, 0.3, 0.9, 0.5), row(1, 0.6, 0.8, 0.4), row(1.5, 0.7, 0.8, 0.4, ppl=9.0),
                         row(2, 0.9, 0.5, 0.4), row(4, 1.0, 0.7, 0.1)])
    assert recommend(result, ["joy"]) == {"joy": 1}  # 1.5 is too disfluent, 2 repeats, 4 is off topic
    assert recommend(EvalResult([base, row(2, 0.9, 0.5, 0.4)]), ["joy"]) == {"joy": None}
