"""eval --claims end to end on a tiny random model (the report's structure and each metric's computation, not
its quality): one engine, every variant in one batch, the files it writes."""

import json
import subprocess
import sys

import pytest
from conftest import RUNNER

from vllm_emosteer.emotions import EMOTIONS
from vllm_emosteer.quality.claims import DOSES, SUPPRESSION


@pytest.mark.skipif(RUNNER == "v2", reason="every claims variant sampled through Triton's interpreter takes more "
                                           "than 15 minutes on 2 cores (docs/testing.md)")
def test_claims_report_on_a_tiny_model(tiny_llama, tiny_bank_path, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vllm_emosteer.cli", "eval", "--claims", "--model", str(tiny_llama), "--vectors",
         str(tiny_bank_path), "--prompts", "3", "--queries", "2", "--whole-prompts", "2", "--max-tokens", "8",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "claims.json").read_text())
    assert (tmp_path / "claims.png").stat().st_size > 20_000
    assert "## Verdicts" in (tmp_path / "claims.md").read_text() and "## 4. Whole answers" in result.stdout
    assert report["sizes"] == {"questions": 3, "queries": 2, "whole": 2, "whole_tokens": 256, "max_tokens": 8,
                               "requests": 3 * (1 + 5 * (1 + len(DOSES)) + 10 * 3) + 5 * 2 * (2 + len(SUPPRESSION))
                               + 2 * 11}
    assert set(report["verdicts"]) == {"continuous", "suppression", "additivity", "consistency"}
    for verdict in report["verdicts"].values():
        assert verdict["verdict"].startswith(("holds", "does not hold")) and verdict["number"]
    for e in EMOTIONS:
        dose = report["dose_response"][e]
        assert dose["levels"] == [0.0, *DOSES] and len(dose["hit_agreed"]) == len(DOSES) + 1
        assert all(0 <= h <= 1 for h in dose["hit_nade"] + dose["hit_minilm"])
        assert dose["hit_agreed"] == [min(n, m) for n, m in zip(dose["hit_nade"], dose["hit_minilm"])]
        assert set(report["suppression"][e]["levels"]) == {"-0.5", "-1", "-2", "calm prompt"}
        assert report["suppression"][e]["questions"] == 2
        whole = report["whole_answers"][e]["steered"]
        assert len(whole["thirds_nade"]) == 3 and whole["distinct2"] >= 0
    assert len(report["mixes"]["1+1"]) == 10 and set(report["mixes"]) == {"1+1", "0.5+0.5", "prompted"}
    # the unsteered answer compared with itself: similarity 1 (the reference is found per question)
    rows = {r["label"]: r for r in report["rows"]}
    assert abs(rows["unsteered"]["sim"] - 1) < 1e-4 and abs(rows["joy queries unsteered"]["sim"] - 1) < 1e-4
    assert rows["joy 3"]["sim"] < 1 and rows["whole joy 1"]["answers"] == 2
    # the answers of the 256-token variants are long: steering was not cut short
    assert all(len(a["text"].split()) > 30 for a in report["answers"]["whole joy 1"])
    for label, (low, high) in ((k, v["nade"]) for k, v in report["intervals"].items()):
        assert 0 <= low <= rows[label]["hit_nade"] <= high <= 1
    summary = json.loads((tmp_path / "claims-summary.json").read_text())
    assert set(summary["expressed"]) == set(EMOTIONS) and summary["digest"] == report["digest"]
