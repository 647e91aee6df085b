"""Import and export: the paper's published JSON loads with its values unchanged, GGUF control vectors round-trip
(llama.cpp has no layer 0) and import as repeng writes them, export needs the residual hook, bad sources are
refused."""

from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_emosteer.vectors.bank import BankError, EmotionBank
from vllm_emosteer.vectors.interop import detect_format, export_gguf, import_gguf, import_paper_json

PAPER = Path(__file__).resolve().parents[3] / "shared/data/emotionvector-paper/EMVector-qwen2.5"
EXCERPT = Path(__file__).parents[1] / "data/paper-qwen2.5-excerpt"


def test_import_paper_excerpt_real_values(tmp_path):
    """Always runs: two layers of two real files, values unchanged."""
    import json

    bank = import_paper_json([EXCERPT])
    assert sorted(bank.emotions) == ["anger", "joy"] and bank.layers == [0, 27] and bank.hidden_size == 3584
    joy = json.loads((EXCERPT / "qwen2.5_joy.json").read_text())
    assert torch.equal(bank.vectors[1, bank.emotions.index("joy")], torch.tensor(joy["27"][0], dtype=torch.float32))
    assert bank.norms()[1].mean() > 5 * bank.norms()[0].mean()  # the paper's vectors grow with depth
    assert torch.equal(EmotionBank.load(bank.save(tmp_path / "q.safetensors")).vectors, bank.vectors)


@pytest.mark.skipif(not PAPER.is_dir(), reason="the paper's Qwen2.5 vectors are not beside this checkout")
def test_import_paper_qwen_vectors(tmp_path):
    import json

    assert detect_format(PAPER) == "paper-json"
    bank = import_paper_json([PAPER])
    assert list(bank.vectors.shape) == [28, 5, 3584]
    assert sorted(bank.emotions) == ["anger", "disgust", "fear", "joy", "sadness"]
    assert bank.hook == "attn_out" and bank.layers == list(range(28))
    joy = json.loads((PAPER / "qwen2.5_joy.json").read_text())
    e = bank.emotions.index("joy")
    assert torch.allclose(bank.vectors[27, e], torch.tensor(joy["27"][0], dtype=torch.float32))
    loaded = EmotionBank.load(bank.save(tmp_path / "qwen.safetensors"))
    assert torch.equal(loaded.vectors, bank.vectors)
    # the paper's observation: norms grow with depth
    assert bank.norms()[27].mean() > 5 * bank.norms()[0].mean()


def test_gguf_round_trip(tmp_path):
    vectors = torch.randn(6, 2, 32)
    bank = EmotionBank(vectors, ["joy", "fear"], "residual", list(range(6)), {"name": "toy"})
    paths = export_gguf(bank, tmp_path / "toy.gguf")
    assert [p.name for p in paths] == ["toy-joy.gguf", "toy-fear.gguf"]
    assert detect_format(paths[0]) == "gguf"
    back = import_gguf(paths)
    assert back.emotions == ["joy", "fear"] and back.hook == "residual"
    assert back.layers == [1, 2, 3, 4, 5]  # llama.cpp has no direction.0
    assert torch.equal(back.vectors, vectors[1:])


def test_gguf_from_repeng_style_writer(tmp_path):
    """A file as repeng's export_gguf writes it: arch controlvector, model_hint, direction.<layer>."""
    import gguf

    path = tmp_path / "happy.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    rows = {3: np.full(16, 0.5, np.float32), 7: np.arange(16, dtype=np.float32)}
    for layer, row in rows.items():
        writer.add_tensor(f"direction.{layer}", row)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    bank = import_gguf([path], emotions=["joy"])
    assert bank.layers == [3, 7] and bank.emotions == ["joy"]
    assert torch.equal(bank.vectors[1, 0], torch.arange(16, dtype=torch.float32))
    assert bank.recipe["model_hint"] == ["llama"]


def test_export_refuses_attention_hook(tmp_path):
    bank = EmotionBank(torch.randn(2, 1, 8), ["joy"], "attn_out", [0, 1])
    with pytest.raises(BankError, match="hook 'residual'"):
        export_gguf(bank, tmp_path / "x.gguf")


def test_bad_sources(tmp_path):
    (tmp_path / "m_joy.json").write_text("[1, 2]")
    with pytest.raises(BankError, match="not a paper emotion-vector file"):
        import_paper_json([tmp_path / "m_joy.json"])
    (tmp_path / "fake.gguf").write_bytes(b"GGUFxxxx")
    with pytest.raises(BankError, match="not a readable GGUF"):
        import_gguf([tmp_path / "fake.gguf"])
