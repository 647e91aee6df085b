"""The CLI's exit codes and messages, run as users run it (a subprocess)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import RUNNER

from vllm_emosteer.vectors.bank import EmotionBank
from vllm_emosteer.vectors.interop import export_gguf


def run(*args):
    return subprocess.run([sys.executable, "-m", "vllm_emosteer.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_inspect_bundled_json_and_plot(tmp_path):
    result = run("inspect", "--json", "--plot", tmp_path / "p.png")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["emotions"] == ["joy", "anger", "disgust", "fear", "sadness"]
    assert info["hidden_size"] == 576 and len(info["layers"]) == 30 and info["hook"] == "attn_out"
    assert set(info["cosine"]) == set(info["emotions"]) and info["cosine"]["joy"][0] == pytest.approx(1.0)
    assert (tmp_path / "p.png").stat().st_size > 10_000
    text = run("inspect")
    assert text.returncode == 0 and "cosine similarity" in text.stdout and "L2 norm per layer" in text.stdout


@pytest.mark.parametrize("content, message", [(None, "not found"), (b"garbage", "not a readable safetensors")])
def test_inspect_bad_files(tmp_path, content, message):
    path = tmp_path / "bank.safetensors"
    if content is not None:
        path.write_bytes(content)
    result = run("inspect", path)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_inspect_truncated_file(tmp_path):
    good = EmotionBank(torch.randn(3, 2, 16), ["joy", "fear"], "attn_out", [0, 1, 2]).save(tmp_path / "g.safetensors")
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(good.read_bytes()[:-50])
    result = run("inspect", bad)
    assert result.returncode == 1 and "not a readable safetensors" in result.stderr


def test_import_export_and_their_errors(tmp_path, tiny_llama):
    bank = EmotionBank(torch.randn(4, 2, 128), ["joy", "fear"], "residual", [0, 1, 2, 3])
    bank.save(tmp_path / "b.safetensors")
    result = run("export", tmp_path / "b.safetensors", "--gguf", tmp_path / "v.gguf", "--emotion", "joy")
    assert result.returncode == 0, result.stderr
    result = run("import", tmp_path / "v.gguf", "--emotion", "joy", "--out", tmp_path / "back.safetensors",
                 "--model", tiny_llama)
    assert result.returncode == 0, result.stderr
    back = EmotionBank.load(tmp_path / "back.safetensors")
    assert back.emotions == ["joy"] and back.layers == [1, 2, 3]
    assert torch.equal(back.vectors, bank.vectors[1:, :1])
    assert back.model["architecture"] == "LlamaForCausalLM"

    unknown = run("export", tmp_path / "b.safetensors", "--gguf", tmp_path / "x.gguf", "--emotion", "love")
    assert unknown.returncode == 1 and "unknown emotion(s) ['love']" in unknown.stderr
    missing = run("import", tmp_path / "nope.json", "--out", tmp_path / "o.safetensors")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    wide = EmotionBank(torch.randn(2, 1, 64), ["joy"], "residual", [1, 2])
    export_paths = export_gguf(wide, tmp_path / "w.gguf")
    wrong = run("import", export_paths[0], "--out", tmp_path / "o.safetensors", "--model", tiny_llama)
    assert wrong.returncode == 1 and "vectors have hidden size 64, model has 128" in wrong.stderr


def test_usage_errors():
    assert run("extract").returncode == 2
    bad_emotion = run("extract", "--out", "/tmp/x.safetensors", "--emotions", "love")
    assert bad_emotion.returncode == 2 and "unknown emotion(s) ['love']" in bad_emotion.stderr


@pytest.mark.skipif(RUNNER == "v2", reason="vLLM's top-k/top-p Triton kernel does not run under Triton's interpreter "
                                           "(a tl.range index is a Python int there), steered or not; the greedy demo "
                                           "runs on both runners in test_runners.py")
def test_demo_runs_and_closes_with_the_claims_verdict():
    result = run("demo", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "21 requests with 7 different steering settings ran in one batch" in result.stdout
    assert "temperature 0.7" in result.stdout and "--- fear+sadness 1+1" in result.stdout
    assert "joy expressed" in result.stdout.splitlines()[-1]
