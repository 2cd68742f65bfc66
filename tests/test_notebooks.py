"""The notebooks: committed without outputs, and each runs top to bottom on a tiny synthetic SVHN."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("eda.ipynb", "baseline_model.ipynb", "augmentation_stages.ipynb")
# Folders whose notebooks are not the project's (environments, caches, data and results).
NOT_PROJECT = {".venv", ".git", ".ipynb_checkpoints", "data", "models", "reports"}

# Smaller than the quick plan, so the notebooks add only minutes to the suite. Two seeds per cell, so the
# seed-aware verdicts run; a flipped stage and its no-flip twin, and a learned policy, so every SimpleCNN path
# runs. The quick plan leaves the large model out (its sections print one line); LARGE_MODEL_PLAN puts it
# back at tiny sizes (an augmented cell, two tuning trials, the final model and the distillation), so the
# full plan's code paths run too.
TEST_PLAN = dict(
    simple_stages=("stage1_basic", "stage3_color"), simple_p_augs=(0.0, 1.0), seeds=(0, 1),
    extra_stages=("stage3_color_noflip", "trivialaugment"), simple_epochs=1, n_train=300, n_test=100,
    severities=(1,),
)
LARGE_MODEL_PLAN = dict(
    TEST_PLAN, large_model="resnet18", resnet_stages=("stage1_basic",), resnet_p_augs=(0.0, 1.0), resnet_epochs=1,
    tune_trials=2, tune_epochs=1, final_epochs=1, resnet_n_train=100,
)
# Text that must never reach a cell's output: warnings, tqdm's missing-widget notice, ANSI colour codes.
FORBIDDEN_OUTPUT = ("Warning", "IProgress", "\x1b[")


def injected_parameters(plan: dict) -> str:
    """Injected after the parameters cell, as papermill does (names a notebook does not use are harmless)."""
    return f'DATASET = "synthetic"\nQUICK = True\nDEVICE = "cpu"\nPLAN_OVERRIDES = {plan!r}\n'


def project_notebooks() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.ipynb") if not NOT_PROJECT & set(p.relative_to(ROOT).parts))


def is_parameters(cell) -> bool:
    return "parameters" in cell.metadata.get("tags", [])


def test_notebooks_are_committed_clean():
    paths = project_notebooks()
    assert {p.name for p in paths} >= set(NOTEBOOKS)
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        for cell in code:
            assert cell.outputs == [], f"{path.name}: a cell has outputs (clear them before committing)"
            assert cell.execution_count is None, f"{path.name}: a cell has an execution count"
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), path.name
        assert [is_parameters(cell) for cell in nb.cells].count(True) == 1, f"{path.name}: one parameters cell"
        assert nb.cells[1] is code[0] and is_parameters(code[0]), f"{path.name}: parameters cell after the title"


@pytest.fixture(scope="module")
def notebook_dirs(tiny_data_dir, tmp_path_factory) -> dict[str, Path]:
    """Data, models and reports folders shared by the notebooks of this module: the baseline notebook's
    runs are the p_aug = 0 cells of the augmentation notebook's grids, as they are in reports/."""
    out = tmp_path_factory.mktemp("notebooks")
    return {"DATA": tiny_data_dir, "MODELS": out / "models", "REPORTS": out / "reports"}


def image_outputs(nb) -> int:
    return sum("image/png" in output.get("data", {}) for cell in nb.cells for output in cell.get("outputs", []))


def output_texts(nb) -> list[str]:
    """Every text a cell printed or displayed: streams, tracebacks and the text forms of displayed data."""
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts += output.get("traceback", [])
            texts += [value for key, value in output.get("data", {}).items() if key.startswith("text/")]
    return ["".join(text) if isinstance(text, list) else text for text in texts]


def execute(name: str, plan: dict, notebook_dirs: dict, monkeypatch) -> tuple:
    """Run a notebook with the test plan, as JupyterLab would with MPLBACKEND=Agg exported (as the Makefile
    does); returns the executed notebook and the PNGs written under reports/figures while it ran."""
    for key, path in notebook_dirs.items():
        monkeypatch.setenv(f"SVHN_AUG_{key}_DIR", str(path))  # the kernel inherits the environment
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the notebooks must show their figures inline all the same
    nb = nbformat.read(ROOT / name, as_version=4)
    index = next(i for i, cell in enumerate(nb.cells) if is_parameters(cell))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(injected_parameters(plan), metadata={"tags": ["injected"]}))
    started = time.time()
    # Raises CellExecutionError, naming the cell, on any error.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    figures = notebook_dirs["REPORTS"] / "figures"
    return nb, [p for p in figures.glob("synthetic_*.png") if p.stat().st_mtime >= started]


def check_outputs(name: str, nb, written: list[Path], min_figures: int) -> None:
    shown = image_outputs(nb)
    assert shown >= min_figures, f"{name} showed only {shown} figures"
    assert shown == len(written), f"{name} showed {shown} figures but wrote {len(written)} PNGs"
    for text in output_texts(nb):
        for forbidden in FORBIDDEN_OUTPUT:
            assert forbidden not in text, f"{name}: {forbidden!r} in a cell's output: {text[:300]!r}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, notebook_dirs, monkeypatch):
    nb, written = execute(name, TEST_PLAN, notebook_dirs, monkeypatch)
    check_outputs(name, nb, written, min_figures=5)
    if name != "eda.ipynb":  # the quick plan leaves the large model out, in one line per section
        assert any("needs a GPU-sized budget" in text for text in output_texts(nb)), name


# The augmentation notebook first: the baseline notebook then loads its ResNet18Cifar baseline instead of training it.
@pytest.mark.parametrize("name", ("augmentation_stages.ipynb", "baseline_model.ipynb"))
def test_notebook_runs_with_the_large_model(name, notebook_dirs, monkeypatch):
    nb, written = execute(name, LARGE_MODEL_PLAN, notebook_dirs, monkeypatch)
    check_outputs(name, nb, written, min_figures=5)
    texts = output_texts(nb)
    assert not any("needs a GPU-sized budget" in text for text in texts), name
    assert any("ResNet18Cifar" in text for text in texts), name
