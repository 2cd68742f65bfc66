"""Every ```python block of README.md runs on its own: a fresh interpreter, the repository root as working
directory, data, models and reports in temporary folders (the synthetic data: the suite's tiny copy)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
# A block states what it costs: a comment such as "# About 10 s on a 2-core CPU".
TIME_COMMENT = re.compile(r"^#.*\babout \d+ s\b", re.IGNORECASE | re.MULTILINE)
BLOCK_TIMEOUT_S = 300


def readme_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def block_id(code: str) -> str:
    """The block's first comment line, shortened: names the failing block in pytest's output."""
    first = next((line.lstrip("# ") for line in code.splitlines() if line.startswith("#")), code.splitlines()[0])
    return re.sub(r"\W+", "-", first)[:50].strip("-")


BLOCKS = readme_blocks()


def test_readme_has_the_python_blocks_it_promises():
    assert len(BLOCKS) >= 4, "README.md lost its Python examples"
    for code in BLOCKS:
        assert TIME_COMMENT.search(code), f"a README block does not say how long it takes:\n{code}"
        # Synthetic data is normalized with its own statistics, never with real SVHN's.
        assert "SVHN_MEAN" not in code and "SVHN_STD" not in code, code


@pytest.mark.parametrize("code", BLOCKS, ids=[block_id(code) for code in BLOCKS])
def test_readme_block_runs_on_its_own(code, tmp_path, tiny_data_dir):
    env = {
        **os.environ,
        "SVHN_AUG_DATA_DIR": str(tiny_data_dir),
        "SVHN_AUG_MODELS_DIR": str(tmp_path / "models"),
        "SVHN_AUG_REPORTS_DIR": str(tmp_path / "reports"),
        "MPLBACKEND": "Agg",
        "PYTHONPATH": "",  # only what a user has: the working directory (the repository root)
    }
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_S)
    output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, f"README block failed:\n{code}\n{output}"
    assert "Traceback" not in result.stderr, result.stderr


def test_readme_images_exist_and_the_gallery_has_every_main_figure():
    import reports

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text(encoding="utf-8"))
    assert [path for path in images if not (ROOT / path).is_file()] == []
    assert {Path(path).stem for path in images if path.startswith("docs/gallery/")} == set(reports.GALLERY_FIGURES)
