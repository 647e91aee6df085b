"""The claims' statistics on fixed score tables, and the claims' questions held out from extraction and calibration."""

import pytest

from vllm_emosteer.emotions import EMOTIONS
from vllm_emosteer.quality.claims import (DOSES, SUPPRESSION, both_rise, claims_questions,
                                          dose_response, emotional_queries, relative_drop, spearman, stops_rising,
                                          suppression, thirds, wilson)
from vllm_emosteer.quality.evaluate import CALIBRATION_PROMPTS, EvalResult, neutral_prompts


def test_spearman_and_ties():
    assert spearman([0, 1, 2, 3], [0.1, 0.2, 0.5, 0.9]) == pytest.approx(1.0)
    assert spearman([0, 1, 2, 3], [0.9, 0.5, 0.2, 0.1]) == pytest.approx(-1.0)
    assert spearman([0, 1, 2, 3], [0.1, 0.3, 0.3, 0.2]) == pytest.approx(0.316, abs=1e-3)  # average ranks
    assert spearman([0, 1], [0, 1]) is None and spearman([0, 1, 2], [1, 1, 1]) is None


def test_wilson_interval():
    low, high = wilson(0.5, 32)
    assert low == pytest.approx(0.336, abs=1e-3) and high == pytest.approx(0.664, abs=1e-3)
    assert wilson(0.0, 20)[0] == 0.0 and wilson(1.0, 20)[1] == 1.0 and wilson(0.3, 0) == (0.0, 1.0)


def test_stops_rising_and_drop():
    assert stops_rising([0, 0.5, 1, 2], [0.1, 0.6, 0.61, 0.5]) == 0.5
    assert stops_rising([0, 0.5, 1, 2], [0.1, 0.2, 0.4, 0.8]) == 2
    assert relative_drop(0.5, 0.05) == pytest.approx(0.9) and relative_drop(0.0, 0.1) is None


def _row(label, e, score, hit=0.5, distinct=0.9, topic=0.5, ppl=3.0, n=10):
    row = {"label": label, "answers": n, "distinct2": distinct, "topic": topic, "ppl": ppl, "hit_nade": hit,
           "hit_minilm": hit, "coherent_hit_nade": hit, "coherent_hit_minilm": hit}
    for o in EMOTIONS:
        row.update({f"score_{o}": score if o == e else 0.1, f"minilm_{o}": score if o == e else 0.1,
                    f"top_{o}": hit if o == e else 0.0, f"top_minilm_{o}": hit if o == e else 0.0})
    return row


def test_dose_response_is_monotone_up_to_where_coherence_breaks():
    rising = [0.2, 0.3, 0.5, 0.6, 0.7, 0.2]  # the last level (3) loops: distinct-2 0.3
    rows = [_row("unsteered", "fear", 0.1, hit=0.0)] + [
        _row(f"fear {x:g}", "fear", s, hit=s, distinct=0.3 if x == 3 else 0.9) for x, s in zip(DOSES, rising)]
    rows.append(_row("prompted fear", "fear", 0.4, hit=0.4))
    d = dose_response(EvalResult(rows), ["fear"])["fear"]
    assert d["coherence_breaks_at"] == 3.0 and d["coherent"] == [True] * 6 + [False]
    assert d["rho_nade"] == pytest.approx(1.0) and d["rho_nade_all"] < 1
    assert d["stops_rising_at"] == 2.0 and d["hit_agreed"][0] == 0.0
    assert d["prompted"]["hit_agreed"] == 0.4


def test_suppression_drop_and_the_other_emotions():
    rows = [_row("sadness queries unsteered", "sadness", 0.5)] + [
        _row(f"sadness queries {x:g}", "sadness", 0.5 * (1 + x / 2.5)) for x in SUPPRESSION]
    rows.append(_row("sadness queries calm prompt", "sadness", 0.25))
    d = suppression(EvalResult(rows), ["sadness"])["sadness"]
    assert d["levels"]["-1"]["drop_nade"] == pytest.approx(0.4)
    assert d["levels"]["-2"]["drop_nade"] == pytest.approx(0.8) and d["levels"]["calm prompt"]["drop_nade"] == 0.5
    assert d["levels"]["-1"]["others_nade"] == {o: 0.1 for o in EMOTIONS if o != "sadness"}


def test_both_components_must_rise_against_the_same_question():
    base = [{"question": "a", "nade": {"joy": 0.1, "fear": 0.1}}, {"question": "b", "nade": {"joy": 0.5, "fear": 0.0}}]
    answers = [{"question": "b", "nade": {"joy": 0.6, "fear": 0.2}}, {"question": "a", "nade": {"joy": 0.3, "fear": 0.1}}]
    assert both_rise(answers, base, ("joy", "fear"), "nade") == 0.5


def test_thirds_split_the_words():
    assert thirds("a b c d e f g") == ["a b", "c d e", "f g"]
    assert thirds("") == ["", "", ""]


def test_claims_questions_are_held_out_from_extraction_and_calibration():
    from vllm_emosteer.extraction.extract import extraction_questions

    questions = claims_questions()
    calibration = neutral_prompts()[:CALIBRATION_PROMPTS]  # what `vllm-emosteer calibrate` reads by default
    assert len(questions) == 32 and not set(questions) & set(calibration)
    assert not set(questions) & set(extraction_questions())
    queries = {q for e in EMOTIONS for q in emotional_queries(e)}
    assert len(queries) == 5 * 20 and not queries & set(extraction_questions()) and not queries & set(calibration)


def test_the_bundled_vectors_never_read_emotionquery():
    from vllm_emosteer.engine.options import load_bank, vectors_path

    recipe = load_bank(vectors_path(None)).recipe
    assert recipe["recipe"] == "contrast" and "EmotionQuery" not in recipe["source"]
