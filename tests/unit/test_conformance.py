"""The conformance check (engine/conformance.py) reads vLLM's sources against vllm_internals.INTERNALS: the installed
vLLM passes with every internal present; a doctored copy (a method renamed, a parameter removed) fails and says
which and why; the V1 runner group may be absent as a whole but not in part; one_of alternatives, optional entries,
inherited methods and the importers of the block-key function behave as specified."""

import zipfile

import pytest

from vllm_emosteer.engine.conformance import ABSENT, OK, Source, check_source, main, read_source
from vllm_emosteer.engine.vllm_internals import INTERNALS, RUNNER_GROUPS, Internal

# the V1 runner group's anchor module, and the other modules of its entries
V1_FILES = (RUNNER_GROUPS["V1 runner"].replace(".", "/") + ".py", "vllm/v1/worker/cpu_model_runner.py",
            "vllm/v1/worker/gpu_input_batch.py")


@pytest.fixture(scope="module")
def installed():
    return read_source("installed")


def edited(source: Source, path: str, old: str, new: str) -> dict:
    """The source's files with the first `old` in `path` replaced by `new`."""
    text = source.files[path].decode()
    assert old in text, f"{old!r} not in {path}: the test needs updating for this vLLM"
    return {**source.files, path: text.replace(old, new, 1).encode()}


def cells_by_name(source: Source) -> dict[tuple[str, str], str]:
    return {(entry.module, entry.name): cell for entry, cell in zip(INTERNALS, check_source(source))}


def test_installed_vllm_has_every_internal(installed):
    assert installed.version == "0.32.0"
    cells = cells_by_name(installed)
    assert len(cells) == len(INTERNALS)  # one row per internal, none listed twice
    assert {name: cell for name, cell in cells.items() if cell != OK} == {}  # 0.32 has both runners: nothing absent


def test_doctored_wheel_fails_and_names_what_changed(installed, tmp_path, capsys):
    files = edited(installed, "vllm/v1/engine/input_processor.py", "resumable: bool = False,", "")
    files = edited(Source(files, ""), "vllm/v1/worker/gpu/model_runner.py", "def add_requests(", "def add_reqs(")
    wheel = tmp_path / "vllm-9.9.9-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            if path != "vllm/_version.py":  # the version then comes from the file name
                archive.writestr(path, data)
        archive.writestr("vllm-9.9.9.dist-info/METADATA", "Name: vllm\n")
    assert main([str(wheel)]) == 1
    out, err = capsys.readouterr()
    assert f"vLLM 9.9.9, {len(INTERNALS)} internals, 2 failing" in err
    lines = out.splitlines()
    assert lines[0] == "| internal | used by | 9.9.9 |" and len(lines) == len(INTERNALS) + 2
    failing = [line for line in lines[2:] if not line.endswith(f"| {OK} |")]
    assert len(failing) == 2
    assert "SIGNATURE InputProcessor.process_inputs has no parameter resumable" in failing[0]
    assert "MISSING method GPUModelRunner.add_requests in vllm.v1.worker.gpu.model_runner" in failing[1]


def test_installed_source_passes_from_the_cli(capsys):
    assert main(["installed"]) == 0
    out, err = capsys.readouterr()
    assert "vLLM 0.32.0" in err and "0 failing" in err
    assert out.count(f"| {OK} |") == len(INTERNALS)


def test_v1_runner_group_may_be_absent_as_a_whole_but_not_in_part(installed):
    without_v1 = Source({p: d for p, d in installed.files.items() if p not in V1_FILES}, "like 0.34")
    cells = cells_by_name(without_v1)
    v1 = {(e.module, e.name) for e in INTERNALS if e.group}
    assert len(v1) >= 8
    assert {cells[name] for name in v1} == {ABSENT}
    assert all(cell == OK for name, cell in cells.items() if name not in v1)

    part = Source(edited(installed, V1_FILES[0], "def execute_model(", "def execute("), "V1 in part")
    cells = cells_by_name(part)
    assert cells[("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model")] == (
        "MISSING method GPUModelRunner.execute_model in vllm.v1.worker.gpu_model_runner")
    assert sum(cell not in (OK, ABSENT) for cell in cells.values()) == 1

    no_batch = Source({p: d for p, d in installed.files.items() if p != V1_FILES[2]}, "V1 without its batch")
    cells = cells_by_name(no_batch)
    assert cells[("vllm.v1.worker.gpu_input_batch", "InputBatch")] == "MISSING module vllm.v1.worker.gpu_input_batch"


def test_preprocess_may_give_way_to_model_forward_but_not_both(installed):
    preprocess = ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._preprocess")
    forward = ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._model_forward")
    renamed = Source(edited(installed, V1_FILES[0], "def _preprocess(", "def _prepare("), "no _preprocess")
    cells = cells_by_name(renamed)
    assert (cells[preprocess], cells[forward]) == (ABSENT, OK)
    neither = Source(edited(renamed, V1_FILES[0], "def _model_forward(", "def _forward("), "neither")
    cells = cells_by_name(neither)
    assert cells[preprocess].startswith("MISSING method GPUModelRunner._preprocess")
    assert cells[forward].startswith("MISSING method GPUModelRunner._model_forward")


def test_block_key_modules_after_the_first_are_optional_but_their_signature_is_checked(installed):
    manager = "vllm/v1/simple_kv_offload/manager.py"
    key = ("vllm.v1.simple_kv_offload.manager", "generate_block_hash_extra_keys")
    cells = cells_by_name(Source({p: d for p, d in installed.files.items() if p != manager}, "no manager"))
    assert cells[key] == ABSENT
    first = ("vllm.v1.core.kv_cache_utils", "generate_block_hash_extra_keys")
    assert cells[first] == OK
    redefined = Source(edited(installed, manager, "\nclass ", "\ndef generate_block_hash_extra_keys(request, start):"
                                                            "\n    pass\n\n\nclass "), "manager's own function")
    assert cells_by_name(redefined)[key] == ("SIGNATURE generate_block_hash_extra_keys(request, start): the plugin "
                                             "passes (request, start_token_idx, end_token_idx) by position")
    gone = Source({p: d for p, d in installed.files.items() if p != "vllm/v1/core/kv_cache_utils.py"}, "no utils")
    assert cells_by_name(gone)[first] == "MISSING module vllm.v1.core.kv_cache_utils"
    # a new module that takes the function by name would keep vLLM's unwrapped one: refused
    taker = Source({**installed.files, "vllm/v1/core/new_pool.py":
                    b"from vllm.v1.core.kv_cache_utils import (\n    generate_block_hash_extra_keys,\n)\n"}, "taker")
    assert cells_by_name(taker)[first].startswith("MISSING wrap: vllm.v1.core.new_pool import")


# A tiny fake vLLM: inheritance through imports, a star import, parameters by position and by name
TINY = {
    "vllm/__init__.py": "",
    "vllm/_version.py": "__version__ = version = '1.2.3'\n",
    "vllm/base.py": "class Base:\n    def load_model(self, path, *, strict=False):\n        self.device = 'cpu'\n",
    "vllm/runner/__init__.py": "from .impl import *\n",
    "vllm/runner/impl.py": (
        "from vllm.base import Base as _Base\n\n"
        "class Runner(_Base):\n"
        "    def step(self, scheduler_output, budget=None) -> 'Batch':\n"
        "        self.batch, self.count = None, 0\n"),
}
TINY_TABLE = (
    Internal("vllm.runner", "Runner", "class", attrs=("device", "batch", "count", "step", "load_model")),
    Internal("vllm.runner", "Runner.load_model", "method", ("path",), ("strict",)),
    Internal("vllm.runner", "Runner.step", "method", ("scheduler_output",), ("budget",), returns="Batch"),
    Internal("vllm.gone", "Thing", "class", optional=True),
    Internal("vllm.gone", "Old", "class", group="old"),
)


def tiny(tmp_path, **changes) -> list[str]:
    for path, text in {**TINY, **changes}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    source = read_source(str(tmp_path))
    assert source.version == "1.2.3"
    return check_source(source, TINY_TABLE, {"old": "vllm.gone"})


def test_tiny_vllm_resolves_inherited_methods_and_attributes(tmp_path):
    assert tiny(tmp_path) == [OK, OK, OK, ABSENT, ABSENT]


@pytest.mark.parametrize("step, expected", [
    ("def run_step(self, scheduler_output, budget=None) -> 'Batch':",
     "MISSING method Runner.step in vllm.runner"),
    ("def step(self, scheduler_output) -> 'Batch':", "SIGNATURE Runner.step has no parameter budget"),
    ("def step(self, batch, scheduler_output, budget=None) -> 'Batch':",
     "SIGNATURE Runner.step(batch, scheduler_output, budget): the plugin passes (scheduler_output) by position"),
    ("def step(self, scheduler_output, budget=None) -> list:",
     "SIGNATURE Runner.step returns list; the plugin expects Batch"),
])
def test_tiny_vllm_doctored_fails_with_the_reason(tmp_path, step, expected):
    impl = TINY["vllm/runner/impl.py"].replace("def step(self, scheduler_output, budget=None) -> 'Batch':", step)
    cells = tiny(tmp_path, **{"vllm/runner/impl.py": impl})
    assert cells[2] == expected
    assert cells[:2] == (["MISSING Runner.step", OK] if "run_step" in step else [OK, OK])


def test_tiny_vllm_base_class_changes_are_seen(tmp_path):
    cells = tiny(tmp_path, **{"vllm/base.py": "class Base:\n    def load_model(self, model_path):\n        pass\n"})
    assert cells[0] == "MISSING Runner.device"
    assert cells[1] == "SIGNATURE Runner.load_model(model_path): the plugin passes (path) by position"


def test_tiny_vllm_group_present_must_be_whole(tmp_path):
    cells = tiny(tmp_path, **{"vllm/gone.py": "class Thing:\n    pass\n"})
    assert cells[3:] == [OK, "MISSING class Old in vllm.gone"]


def test_usage_without_sources(capsys):
    assert main([]) == 2
    assert "SOURCE" in capsys.readouterr().err


def test_output_is_a_markdown_table(installed, capsys, monkeypatch):
    monkeypatch.setattr("vllm_emosteer.engine.conformance.read_source", lambda spec: installed)
    assert main(["a", "b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["| internal | used by | 0.32.0 | 0.32.0 |", "|---|---|---|---|"]
    assert all(line.count(" | ") == 3 for line in lines[2:])  # a `|` inside a cell is escaped
    assert any("\\|" in line for line in lines)


@pytest.mark.parametrize("version, known, words", [("0.32.0", True, "run by the plugin's tests"),
                                                   ("0.34.0", True, "checked (its sources, by make conformance), not run"),
                                                   ("0.35.0", False, "neither run nor checked")])
def test_the_start_up_log_says_whether_the_version_was_run_or_only_checked(monkeypatch, version, known, words):
    import vllm

    from vllm_emosteer.engine.vllm_internals import version_status

    monkeypatch.setattr(vllm, "__version__", version)
    assert version_status() == (known, f"vLLM {version} {words} (run: 0.32; checked: 0.33 and 0.34)")
