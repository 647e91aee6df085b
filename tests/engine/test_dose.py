"""Relative doses and calibrated layer bands (vectors format 2) through the real engine: the offset a request
adds is exactly intensity x dose x typical norm x unit(EV) on the emotion's band and zero elsewhere; raw alphas
ignore both; max_dose refuses what goes beyond it; a format-1 file still loads (units "alpha")."""

import json
import pickle

import probes
import pytest
import torch
from engine_helpers import params, prompt, shutdown, tiny_llm
from safetensors.torch import save_file

from vllm_emosteer import steer
from vllm_emosteer.vectors.bank import EmotionBank

EMOTIONS = ["joy", "anger", "disgust", "fear", "sadness"]
NORMS = [3.0, 5.0, 8.0, 13.0]  # per layer of the tiny model


@pytest.fixture(scope="module")
def dose_bank_path(tiny_bank_path, tmp_path_factory):
    bank = EmotionBank.load(tiny_bank_path)
    bank.units, bank.typical_norms = "dose", NORMS
    bank.calibration, bank.bands = {"joy": 0.3, "fear": 0.2}, {"joy": [1, 2]}
    return bank.save(tmp_path_factory.mktemp("dose") / "dose.safetensors")


@pytest.fixture(scope="module")
def llm(tiny_llama, dose_bank_path):
    engine = tiny_llm(tiny_llama, dose_bank_path, options={"max_dose": 0.5})
    yield engine
    shutdown(engine)


def captured_deltas(llm, extra):
    """Per layer: the offset the plugin added to the last generated token's attention output."""
    llm.apply_model(probes.install_capture)
    try:
        llm.generate(prompt(20, 3), params(extra, max_tokens=3))
        captures = [c for worker in llm.apply_model(probes.take_captures) for c in pickle.loads(worker)]
    finally:
        llm.apply_model(probes.remove_capture)
    return {layer: (after - before).double()[-1] for layer, pos, before, after in captures}


def unit(bank, layer, emotion):
    v = bank.vectors[layer, EMOTIONS.index(emotion)].double()
    return v / v.norm()


def test_dose_offset_is_exact_on_the_calibrated_band(llm, dose_bank_path):
    bank = EmotionBank.load(dose_bank_path)
    deltas = captured_deltas(llm, steer(joy=1.5, fear=-1.0))
    for layer, delta in deltas.items():
        expected = -1.0 * 0.2 * NORMS[layer] * unit(bank, layer, "fear")  # fear: no band, every layer
        if 1 <= layer <= 2:
            expected = expected + 1.5 * 0.3 * NORMS[layer] * unit(bank, layer, "joy")
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=2e-5)
    joy_only = captured_deltas(llm, steer(joy=1.0))
    assert [round(float(joy_only[layer].norm()), 4) for layer in range(4)] == [0.0, 0.3 * 5.0, 0.3 * 8.0, 0.0]


def test_request_layers_replace_the_band_and_raw_is_the_plain_alpha(llm, dose_bank_path):
    bank = EmotionBank.load(dose_bank_path)
    deltas = captured_deltas(llm, steer(joy=1.0, layers=(0, 3)))
    assert all(float(deltas[layer].norm()) == pytest.approx(0.3 * NORMS[layer], rel=1e-5) for layer in range(4))
    raw = captured_deltas(llm, steer(joy=0.25, raw=True))  # every layer, 0.25 x EV, no dose, no band
    for layer in range(4):
        torch.testing.assert_close(raw[layer], 0.25 * bank.vectors[layer, 0].double(), rtol=1e-5, atol=2e-5)


def test_max_dose_refuses_and_the_engine_keeps_serving(llm):
    with pytest.raises(ValueError, match="relative dose of 0.6.*max_dose"):
        llm.generate(prompt(8, 1), params(steer(joy=2.0)))  # 2.0 x 0.3 = 0.6 > 0.5
    assert len(llm.generate(prompt(8, 1), params(steer(joy=1.5)))[0].outputs[0].token_ids) == 8


def test_format_1_file_loads_as_alpha_units(tmp_path, tiny_bank_path):
    bank = EmotionBank.load(tiny_bank_path)
    meta = {k: v for k, v in bank.metadata().items() if k not in ("units", "typical_norms", "bands")}
    meta.update(format_version=1, calibration={"joy": 0.5})
    save_file({"vectors": bank.vectors}, tmp_path / "v1.safetensors", metadata={"emosteer": json.dumps(meta)})
    old = EmotionBank.load(tmp_path / "v1.safetensors")
    assert old.units == "alpha" and old.typical_norms is None and old.bands == {}
    coeff = old.coefficients({"joy": 2.0})
    assert torch.equal(coeff[:, 0], torch.full((4,), 1.0)) and coeff[:, 1:].abs().sum() == 0  # 2.0 x alpha 0.5


def test_digest_follows_calibration_and_bands(dose_bank_path):
    bank = EmotionBank.load(dose_bank_path)
    digests = {bank.digest()}
    bank.calibration = {"joy": 0.31, "fear": 0.2}
    digests.add(bank.digest())
    bank.bands = {"joy": [0, 2]}
    digests.add(bank.digest())
    assert len(digests) == 3  # a recalibrated file never shares prefix-cache entries with the old one


def test_dose_units_need_typical_norms(tiny_bank_path):
    bank = EmotionBank.load(tiny_bank_path)
    with pytest.raises(ValueError, match="typical_norms"):
        EmotionBank(bank.vectors, bank.emotions, bank.hook, bank.layers, units="dose")
