"""The demo's closing line comes from the claims report of the same vectors file, and says so when there is none."""

import json

from vllm_emosteer.demo import claims_summary_path, closing_line, variants


def test_closing_line_reads_the_report_of_the_same_vectors(tmp_path):
    vectors = tmp_path / "mine.safetensors"
    summary = {"digest": "abc", "date": "2026-12-02",
               "expressed": {"joy": "yes", "anger": "no", "disgust": "no", "fear": "partly", "sadness": "partly"}}
    assert claims_summary_path(vectors) == tmp_path / "mine.claims.json"
    assert "No claims report" in closing_line(vectors, "abc")
    claims_summary_path(vectors).write_text(json.dumps(summary))
    line = closing_line(vectors, "abc")
    assert "joy expressed; fear, sadness partly; anger, disgust not" in line and "2026-12-02" in line
    assert "No claims report" in closing_line(vectors, "another digest")


def test_the_bundled_vectors_have_their_report():
    from vllm_emosteer.engine.options import load_bank, vectors_path

    path = vectors_path(None)
    assert "No claims report" not in closing_line(path, load_bank(path).digest())


def test_demo_variants_steer_each_emotion_and_a_mix():
    rows = variants(["joy", "fear", "sadness"], 1.0)
    assert [label for label, _, _ in rows] == ["unsteered", "joy 1", "fear 1", "sadness 1", "fear+sadness 1+1"]
    assert rows[-1][1] == ("fear", "sadness") and rows[0][2] is None
