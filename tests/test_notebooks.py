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

# Smaller than the quick plan, so the three notebooks add only minutes to the suite. Every part keeps at
# least one cell of each kind (a flipped stage and its no-flip twin, a learned policy, an augmented ResNet
# cell, two tuning trials) so every code path of the notebooks runs.
TEST_PLAN = dict(
    simple_stages=("stage1_basic", "stage3_color"), simple_p_augs=(0.0, 1.0), seeds=(42,),
    extra_stages=("stage3_color_noflip", "trivialaugment"), resnet_stages=("stage1_basic",),
    resnet_p_augs=(0.0, 1.0), simple_epochs=1, resnet_epochs=1, tune_trials=2, tune_epochs=1, final_epochs=1,
    n_train=300, n_test=100, resnet_n_train=100, severities=(1,),
)
# Injected after the parameters cell, as papermill does (names a notebook does not use are harmless).
TEST_PARAMETERS = f'DATASET = "synthetic"\nQUICK = True\nDEVICE = "cpu"\nPLAN_OVERRIDES = {TEST_PLAN!r}\n'


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


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, notebook_dirs, monkeypatch):
    for key, path in notebook_dirs.items():
        monkeypatch.setenv(f"SVHN_AUG_{key}_DIR", str(path))  # the kernel inherits the environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in JupyterLab
    nb = nbformat.read(ROOT / name, as_version=4)
    index = next(i for i, cell in enumerate(nb.cells) if is_parameters(cell))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(TEST_PARAMETERS, metadata={"tags": ["injected"]}))
    started = time.time()
    # Raises CellExecutionError, naming the cell, on any error.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    figures = notebook_dirs["REPORTS"] / "figures"
    written = [p for p in figures.glob("synthetic_*.png") if p.stat().st_mtime >= started]
    shown = image_outputs(nb)
    assert shown >= 5, f"{name} showed only {shown} figures"
    assert shown == len(written), f"{name} showed {shown} figures but wrote {len(written)} PNGs"
