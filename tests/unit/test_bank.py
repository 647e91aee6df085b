"""The vectors file (format 2): a save/load round trip keeps everything, saving is atomic, and a file that does
not fit the model, is inconsistent, missing, corrupt or from a newer format is refused saying what differs;
derived files (shared component removed, a layer range)."""

import json
from types import SimpleNamespace

import pytest
import torch

import vllm_emosteer.vectors.bank as bank_module
from vllm_emosteer.vectors.bank import BankError, EmotionBank


def make_bank(L=4, E=3, H=64, hook="attn_out"):
    vectors = torch.randn(L, E, H)
    model = {"name": "toy", "architecture": "LlamaForCausalLM", "hidden_size": H, "num_layers": L,
             "config_fingerprint": "abc"}
    return EmotionBank(vectors, ["joy", "fear", "anger"][:E], hook, list(range(L)), model, {"note": "x"},
                       {"joy": 0.5})


def config(hidden=64, layers=4, arch="LlamaForCausalLM"):
    return SimpleNamespace(hidden_size=hidden, num_hidden_layers=layers, architectures=[arch])


def test_round_trip_keeps_everything(tmp_path):
    bank = make_bank()
    path = bank.save(tmp_path / "sub" / "bank.safetensors")
    loaded = EmotionBank.load(path)
    assert torch.equal(loaded.vectors, bank.vectors)
    assert (loaded.emotions, loaded.hook, loaded.layers) == (bank.emotions, bank.hook, bank.layers)
    assert loaded.model == bank.model and loaded.recipe == bank.recipe and loaded.calibration == {"joy": 0.5}
    meta = loaded.metadata()
    assert meta["format_version"] == 2 and meta["units"] == "alpha"
    assert len(meta["norms"]) == 4 and len(meta["norms"][0]) == 3


def test_save_is_atomic(tmp_path, monkeypatch):
    path = make_bank().save(tmp_path / "bank.safetensors")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        open(args[1], "wb").write(b"half")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(bank_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        make_bank().save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]


def test_check_fits_says_what_differs():
    bank = make_bank()
    bank.check_fits(config())
    with pytest.raises(BankError, match="vectors have hidden size 64, model has 3584"):
        bank.check_fits(config(hidden=3584))
    with pytest.raises(BankError, match="made for a 4-layer model, model has 28"):
        bank.check_fits(config(layers=28))
    with pytest.raises(BankError, match="cover layers up to 3, model has 2 layers"):
        bank.check_fits(config(layers=2))
    with pytest.raises(BankError, match="made for LlamaForCausalLM, model is Qwen2ForCausalLM"):
        bank.check_fits(config(arch="Qwen2ForCausalLM"))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: setattr(b, "hook", "mlp"), "unknown hook point"),
        (lambda b: b.vectors.__setitem__((0, 0, 0), float("nan")), "NaN or inf"),
        (lambda b: setattr(b, "emotions", ["joy", "joy", "anger"]), "emotion names"),
        (lambda b: setattr(b, "layers", [0, 1, 2]), "layer indices"),
    ],
)
def test_inconsistent_bank_refused(mutate, message):
    bank = make_bank()
    mutate(bank)
    with pytest.raises(BankError, match=message):
        bank._check_consistent()


def test_bad_files_refused(tmp_path):
    with pytest.raises(BankError, match="not found"):
        EmotionBank.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(BankError, match="not a readable safetensors"):
        EmotionBank.load(junk)
    good = make_bank().save(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(BankError, match="not a readable safetensors"):
        EmotionBank.load(truncated)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2)}, plain)
    with pytest.raises(BankError, match="no 'vectors' tensor"):
        EmotionBank.load(plain)
    future = tmp_path / "future.safetensors"
    meta = make_bank().metadata() | {"format_version": 99}
    save_file({"vectors": torch.zeros(4, 3, 64)}, future, metadata={"emosteer": json.dumps(meta)})
    with pytest.raises(BankError, match="upgrade vllm-emosteer"):
        EmotionBank.load(future)


def test_without_shared_component():
    bank = make_bank()
    derived = bank.without_shared_component()
    assert torch.allclose(derived.vectors.mean(dim=1), torch.zeros(4, 64), atol=1e-6)
    assert torch.allclose(derived.vectors[:, 0] - derived.vectors[:, 1], bank.vectors[:, 0] - bank.vectors[:, 1],
                          atol=1e-6)
    assert derived.calibration == {} and derived.recipe["transform"] == ["remove shared component"]


def test_select_layers():
    bank = make_bank()
    derived = bank.select_layers(1, 2)
    assert derived.layers == [1, 2] and torch.equal(derived.vectors, bank.vectors[1:3])
    with pytest.raises(BankError, match="no layer"):
        bank.select_layers(7, 9)
