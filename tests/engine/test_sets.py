"""Named vector sets in one engine, loaded, replaced and unloaded at run time (the Python API, real engine): exact
offsets across sets, runtime set == start set, in-use refusals, every bad load (paths, corrupt or non-finite
metadata, misfits, names, capacity, the flag) leaves the engine unchanged; layers and bands outside the hooked
layers are refused; several API servers refuse runtime changes."""

import os
import pickle

import probes
import pytest
import torch
from conftest import EMOTIONS, TINY_HIDDEN, TINY_LAYERS
from engine_helpers import params, prompt, tiny_llm, tokens_and_logprobs

from vllm_emosteer import SetUpdateError, SteeringError, load_set, steer, unload_set
from vllm_emosteer.engine.frontend.set_changes import ALLOW_ENV, set_file
from vllm_emosteer.vectors.bank import EmotionBank

CONCEPTS = ["formal", "pirate"]


def concept_bank(path, seed, concepts=CONCEPTS, hidden=TINY_HIDDEN, hook="attn_out"):
    g = torch.Generator().manual_seed(seed)
    bank = EmotionBank(torch.randn(TINY_LAYERS, len(concepts), hidden, generator=g) * 0.5, concepts, hook,
                       list(range(TINY_LAYERS)))
    bank.save(path)
    return bank


@pytest.fixture(scope="module")
def sets_dir(tmp_path_factory, tiny_bank_path):
    folder = tmp_path_factory.mktemp("sets")
    concept_bank(folder / "style.safetensors", 5)
    concept_bank(folder / "other.safetensors", 6)
    concept_bank(folder / "wide.safetensors", 7, concepts=[f"c{i}" for i in range(len(EMOTIONS) + 1)])
    concept_bank(folder / "small.safetensors", 8, hidden=TINY_HIDDEN // 2)
    concept_bank(folder / "residual.safetensors", 9, hook="residual")
    (folder / "corrupt.safetensors").write_bytes(b"not a safetensors file at all")
    for name, field, value in (("nan", "calibration", {"pirate": float("nan")}), ("inf", "typical_norms", [1e999] * 4),
                               ("words", "calibration", {"pirate": "high"})):
        bank = concept_bank(folder / f"{name}.safetensors", 10)
        setattr(bank, field, value)  # after the bank's own checks: what a hand-edited file could hold
        bank.save(folder / f"{name}.safetensors")
    os.symlink(tiny_bank_path, folder / "escape.safetensors")
    return folder


@pytest.fixture(scope="module")
def llm(tiny_llama, tiny_bank_path, sets_dir):
    options = {"vectors": {"emotions": str(tiny_bank_path), "style": str(sets_dir / "style.safetensors")},
               "max_sets": 3, "sets_dir": str(sets_dir)}
    engine = tiny_llm(tiny_llama, options=options)
    yield engine
    engine.llm_engine.engine_core.shutdown()


@pytest.fixture
def allowed(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "1")


def generate(llm, extras, length=40, max_tokens=6):
    outputs = llm.generate([prompt(length, 3)] * len(extras), [params(e, max_tokens=max_tokens) for e in extras])
    return [tokens_and_logprobs(o) for o in outputs]


def assert_same_answer(a, b):
    """Same tokens; logprobs to float tolerance (another block of the bank sums the columns in another order)."""
    assert a[0] == b[0]
    torch.testing.assert_close(torch.tensor(a[1]), torch.tensor(b[1]), rtol=0, atol=1e-4)


def test_rows_of_two_sets_add_exactly(llm, tiny_bank_path, sets_dir):
    emotions, style = EmotionBank.load(tiny_bank_path), EmotionBank.load(sets_dir / "style.safetensors")
    llm.apply_model(probes.install_capture)
    try:
        llm.generate(prompt(12, 1), params(steer(positions="all", joy=0.5, **{"style/pirate": 1.0}), max_tokens=2))
        captures = [c for worker in llm.apply_model(probes.take_captures) for c in pickle.loads(worker)]
    finally:
        llm.apply_model(probes.remove_capture)
    assert {layer for layer, *_ in captures} == set(range(TINY_LAYERS))
    for layer, _, before, after in captures:
        expected = 0.5 * emotions.vectors[layer, 0].double() + 1.0 * style.vectors[layer, 1].double()
        torch.testing.assert_close((after - before).double(), expected.expand_as(after), rtol=0, atol=2e-5)


def test_set_chosen_by_field_or_prefix_is_the_same_request(llm):
    by_field, by_prefix = generate(llm, [steer(set="style", pirate=1.5), steer(**{"style/pirate": 1.5})])
    assert by_field == by_prefix
    flat = generate(llm, [{"emotion": "pirate", "intensity": 1.5, "steer_set": "style"}])[0]
    assert flat == by_field
    with pytest.raises(SteeringError, match="unknown emotion 'joy' in emosteer.emotions; set 'style' has"):
        generate(llm, [steer(set="style", joy=1.0)])
    with pytest.raises(SteeringError, match="unknown vector set 'nope'"):
        generate(llm, [steer(**{"nope/joy": 1.0})])


def test_runtime_load_equals_a_set_given_at_start_and_unload_forgets_it(llm, allowed):
    with pytest.raises(SteeringError, match="unknown vector set 'style2'"):
        generate(llm, [steer(**{"style2/pirate": 1.5})])
    described = load_set(llm, "style2", "style.safetensors")
    assert described["emotions"] == CONCEPTS and not described["default"]
    try:
        runtime, start = generate(llm, [steer(**{"style2/pirate": 1.5, "joy": 0.3}),
                                        steer(**{"style/pirate": 1.5, "joy": 0.3})])
        assert_same_answer(runtime, start)
        assert runtime != generate(llm, [None])[0]
    finally:
        unload_set(llm, "style2")
    with pytest.raises(SteeringError, match="unknown vector set 'style2'"):
        generate(llm, [steer(**{"style2/pirate": 1.5})])
    assert generate(llm, [steer(**{"style/pirate": 1.5, "joy": 0.3})])[0] == start  # the engine keeps serving


def test_mixed_sets_in_one_batch_equal_one_request_at_a_time(llm, allowed):
    load_set(llm, "other", "other.safetensors")
    try:
        extras = [None, steer(joy=1.0), steer(set="style", formal=1.2), steer(set="other", formal=1.2),
                  steer(**{"other/pirate": -0.8, "style/formal": 0.4, "fear": 0.5})]
        together = generate(llm, extras)
        alone = [generate(llm, [extra])[0] for extra in extras]
        assert together == alone
        assert len({tuple(t) for t, _ in together}) == len(extras)
    finally:
        unload_set(llm, "other")


def test_replacing_a_set_never_reuses_its_prefix_cache(llm, allowed):
    extra = steer(set="swap", pirate=1.5, positions="all")
    long_prompt = prompt(100, 9)

    def run():
        output = llm.generate(long_prompt, params(extra, max_tokens=6))[0]
        return tokens_and_logprobs(output), output.num_cached_tokens

    load_set(llm, "swap", "style.safetensors")
    try:
        first, _ = run()
        again, cached = run()
        assert again == first and cached > 0
        load_set(llm, "swap", "other.safetensors", replace=True)
        replaced, cached = run()
        assert cached == 0 and replaced != first
        unload_set(llm, "swap")
        load_set(llm, "ref", "other.safetensors")
        reference = tokens_and_logprobs(llm.generate(long_prompt, params(steer(set="ref", pirate=1.5,
                                                                               positions="all"), max_tokens=6))[0])
        assert_same_answer(replaced, reference)
    finally:
        for name in ("swap", "ref"):
            try:
                unload_set(llm, name)
            except SetUpdateError:
                pass


def test_unload_is_refused_while_a_request_uses_the_set(llm, allowed):
    engine = llm.llm_engine
    load_set(llm, "busy", "style.safetensors")
    engine.add_request("busy-1", prompt(20, 4), params(steer(set="busy", pirate=1.0), max_tokens=4))
    with pytest.raises(SetUpdateError, match="used by 1 unfinished request") as refused:
        unload_set(llm, "busy")
    assert refused.value.status == 409
    with pytest.raises(SetUpdateError, match="used by 1 unfinished request"):
        load_set(llm, "busy", "other.safetensors", replace=True)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["busy-1"] and len(finished[0].outputs[0].token_ids) == 4
    unload_set(llm, "busy")


@pytest.mark.parametrize("name, file, status, words", [
    ("x", "../style.safetensors", 400, "without '..'"),
    ("x", "/etc/passwd", 400, "without '..'"),
    ("x", "escape.safetensors", 400, "outside sets_dir"),
    ("x", "missing.safetensors", 404, "no file 'missing.safetensors'"),
    ("x", "corrupt.safetensors", 400, "not a readable safetensors file"),
    ("x", "small.safetensors", 400, "hidden size"),
    ("x", "residual.safetensors", 400, "hook 'residual'"),
    ("x", "wide.safetensors", 400, "hold at most 5"),
    ("x", "nan.safetensors", 400, "calibration of pirate must be finite"),
    ("x", "inf.safetensors", 400, "typical_norms must be finite"),
    ("x", "words.safetensors", 400, "calibration of pirate must be a number"),
    ("x", "x" * 300 + ".safetensors", 400, "cannot be opened in sets_dir"),
    ("bad name!", "style.safetensors", 400, "must be 1-64 letters"),
    ("style", "other.safetensors", 409, "replace: true"),
    ("nope", "other.safetensors", 404, None),  # replace of an unknown set
])
def test_bad_loads_are_refused_and_nothing_changes(llm, allowed, name, file, status, words):
    before = generate(llm, [steer(set="style", pirate=1.0)])
    with pytest.raises(SetUpdateError) as refused:
        load_set(llm, name, file, replace=words is None)
    assert refused.value.status == status and (words is None or words in str(refused.value)), str(refused.value)
    assert generate(llm, [steer(set="style", pirate=1.0)]) == before


def test_capacity_flag_and_unload_errors(llm, allowed, monkeypatch):
    load_set(llm, "third", "other.safetensors")
    try:
        with pytest.raises(SetUpdateError, match=r"no room: all 3 sets are loaded \(option max_sets\)") as full:
            load_set(llm, "fourth", "other.safetensors")
        assert full.value.status == 409
    finally:
        unload_set(llm, "third")
    for name, status, words in [("nope", 404, "unknown vector set 'nope'"), ("emotions", 409, "the default set")]:
        with pytest.raises(SetUpdateError, match=words) as refused:
            unload_set(llm, name)
        assert refused.value.status == status
    monkeypatch.delenv(ALLOW_ENV)
    with pytest.raises(SetUpdateError, match=f"{ALLOW_ENV}=1") as off:
        load_set(llm, "x", "style.safetensors")
    assert off.value.status == 403
    with pytest.raises(SetUpdateError, match=f"{ALLOW_ENV}=1"):
        unload_set(llm, "style")
    with pytest.raises(SetUpdateError, match="sets_dir option") as no_dir:
        set_file(None, "style.safetensors")
    assert no_dir.value.status == 403
    assert generate(llm, [steer(joy=1.0)])[0]


def test_a_start_set_that_does_not_fit_stops_the_engine(tiny_llama, tiny_bank_path, sets_dir):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_emosteer.engine.options import EmosteerConfigError

    for vectors, words in [({"emotions": str(tiny_bank_path), "style": str(sets_dir / "residual.safetensors")},
                            "set 'style' steers at hook 'residual'"),
                           ({"emotions": str(tiny_bank_path), "bad/name": str(sets_dir / "style.safetensors")},
                            "must be 1-64 letters")]:
        with pytest.raises(EmosteerConfigError, match=words):
            EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=256,
                       additional_config={"emosteer": {"vectors": vectors}}).create_engine_config()


def engine_options(tiny_llama, vectors, **options):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_emosteer.engine.options import options_from_vllm_config

    config = EngineArgs(model=str(tiny_llama), dtype="float32", max_model_len=256,
                        additional_config={"emosteer": {"vectors": str(vectors), **options}}).create_engine_config()
    return options_from_vllm_config(config)


def test_layers_outside_the_hooked_ones_are_refused(tiny_llama, tiny_bank_path, tmp_path):
    from vllm_emosteer.engine.options import EmosteerConfigError
    from vllm_emosteer.engine.spec import parse_steering

    limits = engine_options(tiny_llama, tiny_bank_path, layers=[1, 2]).limits
    assert limits.sets["emotions"].hooked == (1, 2)
    with pytest.raises(SteeringError, match="it steers layers 1-2"):
        parse_steering(steer(joy=1.0, layers=(0, 3)), limits)
    banded = EmotionBank.load(tiny_bank_path)
    banded.bands = {"joy": [0, 3]}
    banded.save(tmp_path / "banded.safetensors")
    with pytest.raises(EmosteerConfigError, match="calibrated band of joy, layers 0-3, reaches layers this engine "
                                                  "does not steer"):
        engine_options(tiny_llama, tmp_path / "banded.safetensors", layers=[1, 2])


def test_runtime_changes_are_refused_with_several_api_servers(tiny_llama, tiny_bank_path, sets_dir, allowed):
    from vllm_emosteer.engine.frontend.set_changes import FrontEnd

    options = engine_options(tiny_llama, tiny_bank_path, sets_dir=str(sets_dir), max_sets=2)
    front = FrontEnd(options, None, None, api_servers=2)
    for change in (lambda: front.begin_load("x", "style.safetensors", False), lambda: front.begin_unload("x")):
        with pytest.raises(SetUpdateError, match="need one API server; this engine has 2") as refused:
            change()
        assert refused.value.status == 403


def test_the_engine_core_refuses_to_change_a_set_an_unfinished_request_uses(llm, allowed, sets_dir):
    """The front-end refuses first (above); the engine core, which every change and every request passes (requests of
    other front-ends too), refuses as well (admission.py): here the set-update RPC is sent without the front-end."""
    from vllm_emosteer.engine.sets import update_args
    from vllm_emosteer.engine.vllm_internals import UPDATE_SET_RPC

    engine = llm.llm_engine
    engine.add_request("uses-style", prompt(20, 4), params(steer(set="style", pirate=1.0), max_tokens=150))
    bank = EmotionBank.load(sets_dir / "other.safetensors")
    with pytest.raises(Exception, match="used by 1 unfinished request.s. in the engine core"):
        llm.collective_rpc(UPDATE_SET_RPC, args=update_args("style", bank, "other.safetensors"))
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.outputs[0].finish_reason for o in finished] == ["length"]
