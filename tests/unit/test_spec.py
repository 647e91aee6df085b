"""Request parsing: the nested and flat forms give the same spec, no steering or intensity 0 is unsteered,
fingerprints tell specs apart, and bad input (near-miss field names, flat options without an emotion, layers the
engine does not steer) is refused with a SteeringError naming the field."""

import math

import pytest
import torch

from vllm_emosteer import SteeringError, steer
from vllm_emosteer.engine.spec import SetLimits, SteeringLimits, has_steering_args, parse_steering

LIMITS = SteeringLimits({"emotions": SetLimits(("joy", "anger", "disgust", "fear", "sadness"))}, num_layers=30,
                        max_intensity=8.0, max_emotions=3)


def test_nested_and_flat_forms_give_the_same_spec():
    nested = parse_steering(steer(joy=2.0, fear=0.5, layers=(20, 29)), LIMITS)
    flat = parse_steering({"emotions": ["fear", "joy"], "intensities": [0.5, 2], "steer_layers": [20, 29]}, LIMITS)
    assert nested == flat
    assert nested.intensities == (("fear", 0.5), ("joy", 2.0))
    assert nested.fingerprint() == flat.fingerprint()
    single = parse_steering({"emotion": "JOY", "intensity": 1.5, "steer_positions": "all"}, LIMITS)
    assert single.intensities == (("joy", 1.5),) and single.positions == "all"


def test_no_steering_and_zero_intensity_are_unsteered():
    assert parse_steering(None, LIMITS) is None
    assert parse_steering({"other_plugin": 1}, LIMITS) is None
    assert parse_steering(steer(joy=0.0), LIMITS) is None
    assert parse_steering({"emotion": "joy", "intensity": 0}, LIMITS) is None


def test_fingerprint_tells_specs_apart():
    a = parse_steering(steer(joy=1.0), LIMITS)
    assert a.fingerprint() != parse_steering(steer(joy=1.5), LIMITS).fingerprint()
    assert a.fingerprint() != parse_steering(steer(joy=1.0, positions="all"), LIMITS).fingerprint()
    assert a.fingerprint() != parse_steering(steer(joy=1.0, layers=(0, 3)), LIMITS).fingerprint()


@pytest.mark.parametrize(
    "extra_args, parameter, words",
    [
        ({"emotion": "love", "intensity": 1.0}, "emotion", "unknown emotion 'love'"),
        (steer(love=1.0), "emosteer.emotions", "this server knows"),
        ({"emotion": "joy", "intensity": math.nan}, "intensity", "finite"),
        ({"emotion": "joy", "intensity": math.inf}, "intensity", "finite"),
        ({"emotion": "joy", "intensity": 9.0}, "intensity", "allowed range"),
        ({"emotion": "joy", "intensity": "2"}, "intensity", "must be a number"),
        ({"emotion": "joy", "intensity": True}, "intensity", "must be a number"),
        ({"intensity": 2.0}, "emotion", "without 'emotion'"),
        ({"emotions": ["joy"], "intensities": [1.0, 2.0]}, "intensities", "has 2"),
        ({"emotions": "joy", "intensities": [1.0]}, "emotions", "lists"),
        ({"emotion": "joy", "steer_positions": "prompt"}, "steer_positions", "unknown position mode"),
        ({"emotion": "joy", "steer_layers": [5, 30]}, "steer_layers", "0 <= first <= last < 30"),
        ({"emotion": "joy", "steer_layers": [9, 3]}, "steer_layers", "first <= last"),
        ({"emotion": "joy", "steer_layers": "0-3"}, "steer_layers", "[first, last]"),
        ({"emosteer": {"emotions": {"joy": 1}}, "emotion": "joy"}, "emosteer", "not both"),
        ({"emosteer": {"emotion": {"joy": 1}}}, "emosteer", "unknown keys"),
        ({"emosteer": {"emotions": ["joy"]}}, "emosteer.emotions", "must be an object"),
        ({"emosteer": "joy"}, "emosteer", "must be an object"),
        (steer(joy=1, fear=1, anger=1, sadness=1), "emosteer.emotions", "at most 3"),
        ({"emotions": ["joy", "joy"], "intensities": [1, 1]}, "emotions", "given twice"),
        ({"emotion": "joy", "steer_raw": "yes"}, "steer_raw", "true or false"),
    ],
)
def test_bad_input_names_the_field(extra_args, parameter, words):
    with pytest.raises(SteeringError) as info:
        parse_steering(extra_args, LIMITS)
    assert isinstance(info.value, ValueError)
    assert info.value.parameter == parameter
    assert words in str(info.value)


@pytest.mark.parametrize("key", ["Emotion", "emotions ", "steer_layer", "Steer_Positions", "STEER_RAW"])
def test_near_miss_fields_are_refused_not_ignored(key):
    with pytest.raises(SteeringError, match=f"unknown steering field {key!r}") as info:
        parse_steering({key: "joy"}, LIMITS)
    assert info.value.parameter == key and "steer_layers" in str(info.value)
    assert has_steering_args({key: 1}) and not has_steering_args({"temperature_hint": 1})


@pytest.mark.parametrize("extra_args, parameter", [({"steer_layers": [1, 2]}, "steer_layers"),
                                                   ({"steer_positions": "all"}, "steer_positions"),
                                                   ({"steer_raw": True}, "steer_raw")])
def test_flat_options_without_an_emotion_are_refused(extra_args, parameter):
    with pytest.raises(SteeringError, match="given without any emotion") as info:
        parse_steering(extra_args, LIMITS)
    assert info.value.parameter == parameter


def test_steer_raw_takes_what_the_flat_form_can_carry():
    for value, raw in ((True, True), (1, True), ("true", True), ("FALSE", False), (0, False), (False, False)):
        assert parse_steering({"emotion": "joy", "steer_raw": value}, LIMITS).raw is raw
    with pytest.raises(SteeringError, match="true or false"):
        parse_steering({"emotion": "joy", "steer_raw": 2}, LIMITS)
    with pytest.raises(SteeringError, match="true or false"):
        parse_steering(steer(joy=1.0) | {"emosteer": {"emotions": {"joy": 1.0}, "raw": 1}}, LIMITS)


def test_a_huge_integer_intensity_is_a_steering_error():
    with pytest.raises(SteeringError, match="finite") as info:
        parse_steering({"emotion": "joy", "intensity": 10 ** 400}, LIMITS)
    assert info.value.parameter == "intensity"


def test_layers_the_engine_does_not_steer_are_refused():
    hooked = SteeringLimits({"emotions": SetLimits(("joy", "fear"), hooked=tuple(range(20, 30)))}, num_layers=30,
                            max_intensity=8.0, max_emotions=2)
    assert parse_steering(steer(joy=1.0, layers=(20, 29)), hooked).layers == (20, 29)
    for layers in ((0, 5), (15, 25)):
        with pytest.raises(SteeringError, match="it steers layers 20-29") as info:
            parse_steering(steer(joy=1.0, layers=layers), hooked)
        assert info.value.parameter == "emosteer.layers"


@pytest.mark.parametrize("key, flat", [("positions", "steer_positions"), ("layers", "steer_layers"),
                                       ("raw", "steer_raw"), ("set", "steer_set")])
def test_nested_names_next_to_flat_fields_are_refused(key, flat):
    message = f"unknown steering field {key!r}; the flat form spells it {flat!r}"
    with pytest.raises(SteeringError, match=message) as info:
        parse_steering({"emotion": "joy", "intensity": 1, key: "middle"}, LIMITS)
    assert info.value.parameter == key
    assert parse_steering({key: "middle"}, LIMITS) is None  # without steering fields it is another plugin's


def test_a_layer_range_in_a_gap_of_the_set_is_refused():
    gapped = SteeringLimits({"emotions": SetLimits(("joy", "fear"), hooked=(2, 3, 10, 11))}, num_layers=30,
                            max_intensity=8.0, max_emotions=2)
    assert parse_steering(steer(joy=1.0, layers=(3, 10)), gapped).layers == (3, 10)
    for extra_args, parameter in ((steer(joy=1.0, layers=(4, 9)), "emosteer.layers"),
                                  ({"emotion": "joy", "steer_layers": [5, 5]}, "steer_layers")):
        with pytest.raises(SteeringError, match=r"no steered layer in .* it steers layers 2-3, 10-11") as info:
            parse_steering(extra_args, gapped)
        assert info.value.parameter == parameter


def test_a_calibrated_band_in_a_gap_of_the_set_is_refused():
    from vllm_emosteer.engine.sets import VectorSets
    from vllm_emosteer.vectors.bank import BankError, EmotionBank

    def sets(band):
        bank = EmotionBank(torch.ones(4, 1, 8), ["joy"], "attn_out", [2, 3, 10, 11], bands={"joy": band})
        return VectorSets({"emotions": (bank, "test")}, 1, 30, None, 8.0, 1, 1.0)

    assert sets([3, 10]).layers == [2, 3, 10, 11]
    with pytest.raises(BankError, match="no steered layer in layers 4-9"):
        sets([4, 9])
