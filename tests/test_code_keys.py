"""A stage's cache key covers exactly the project code it runs: its imports, followed statically
(pipelines/code_graph.py), plus the modules it names for imports by computed name."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

import stages  # noqa: F401  (registers the stages)
from pipelines.code_graph import ROOT, closure, code_version, direct_imports
from pipelines.registry import STAGES

TOY = {  # a project: two "stages", helpers, a package __init__ that imports everything
    "toy/__init__.py": "from . import stage_a, stage_b\n",
    "toy/stage_a.py": "def run():\n    from .helpers.maths import twice  # lazy, inside a function\n    return twice(2)\n",
    "toy/stage_b.py": "import toy.helpers.text\nfrom toy.helpers import (\n    words,\n)\n",
    "toy/helpers/__init__.py": "from . import maths, text\n",
    "toy/helpers/maths.py": "def twice(x):\n    return 2 * x\n",
    "toy/helpers/text.py": "from .common import SEP\n",
    "toy/helpers/words.py": "WORDS = ()\n",
    "toy/helpers/common.py": "SEP = ' '\n",
    "toy/dynamic.py": "X = 1\n",
}


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    for name, text in TOY.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def _versions(root: Path, named: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {stage: code_version(modules, root) for stage, modules in named.items()}


@pytest.mark.parametrize("edited, missed", [
    ("toy/helpers/maths.py", {"a"}),          # imported lazily by stage_a only
    ("toy/helpers/common.py", {"b"}),         # reached through text.py
    ("toy/helpers/words.py", {"b"}),          # `from package import (module)` on two lines
    ("toy/dynamic.py", {"named"}),            # only the stage that names it
    ("toy/__init__.py", set()),               # runs on import, but is nobody's dependency
    ("toy/helpers/__init__.py", set()),
])
def test_an_edit_misses_exactly_the_stages_that_import_it(toy, edited, missed):
    named = {"a": ("toy.stage_a",), "b": ("toy.stage_b",), "named": ("toy.stage_a", "toy.dynamic")}
    before = _versions(toy, named)
    path = toy / edited
    path.write_text(path.read_text() + "# edited\n")
    after = _versions(toy, named)
    expected = missed | ({"named"} if "a" in missed else set())
    assert {s for s in named if before[s] != after[s]} == expected


def test_imports_are_read_from_the_source_without_running_it(toy):
    (toy / "toy/stage_a.py").write_text("raise SystemExit('executed')\nimport toy.helpers.common\n")
    assert direct_imports("toy.stage_a", toy) == {"toy.helpers.common"}
    assert closure(("toy.stage_b",), toy) == ["toy.helpers.common", "toy.helpers.text", "toy.helpers.words",
                                              "toy.stage_b"]


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """The project's Python packages in a temporary tree, to edit."""
    for package in ("stages", "pipelines", "models", "devices"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _stage_versions(root: Path) -> dict[tuple[str, str], str]:
    return {(fmt, name): stage.code_version({"format": {"name": fmt}}, root)
            for fmt in ("onnx", "pte") for name, stage in STAGES.items()}


def _missed_after(root: Path, module: str) -> set[tuple[str, str]]:
    before = _stage_versions(root)
    path = root / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + "\n# a one-line edit\n")
    after = _stage_versions(root)
    return {cell for cell in before if before[cell] != after[cell]}


def test_an_onnx_backend_edit_reaches_no_stage_before_the_format(project_copy):
    """Measured before keys came from imports: editing stages/formats/onnx.py missed a .pte run
    from clean_state_dict on (it hashed all of stages.formats to reach one file helper)."""
    missed = _missed_after(project_copy, "stages.formats.onnx")
    assert not {name for _, name in missed} & {"load_checkpoint", "clean_state_dict", "wrap", "baseline"}
    assert ("onnx", "lower") in missed and ("onnx", "verify_target") in missed
    # a .pte cell misses only where pte code imports the onnx backend (the app-side steps file)
    assert ("pte", "lower") in missed


def test_a_pte_scheme_edit_leaves_every_onnx_stage_alone(project_copy):
    missed = _missed_after(project_copy, "stages.formats.pte_precisions")
    assert missed and all(fmt == "pte" for fmt, _ in missed)
    assert ("pte", "quantize") in missed and ("pte", "load_checkpoint") not in missed


@pytest.mark.parametrize("helper, stage, fmt", [
    ("stages.support.model_builder", "lower", "pte"),  # pte.py calls used_tensors
    ("stages.processing", "lower", "onnx"),            # onnx.py calls uses_custom_ops
    ("stages.support.repro", "convert", "onnx"),
    ("stages.runtimes.device_worker", "verify_target", "pte"),
])
def test_a_helper_only_a_late_stage_uses_reaches_its_key(project_copy, helper, stage, fmt):
    """Before, these reached lower's key only because an earlier stage declared the same module."""
    path = project_copy / (helper.replace(".", "/") + ".py")
    if not path.exists():
        helper += ".__init__"
    assert (fmt, stage) in _missed_after(project_copy, helper)
