"""The lessons' stored outputs: one clean run, and nbval really compares them.

The notebooks themselves run under nbval as part of the test command (see pyproject.toml)."""

import json
import shutil

import pytest

from nanopali.export import lesson_notebooks

from conftest import IMAGES, NOTEBOOKS, REPO, run_python

LESSONS = lesson_notebooks(NOTEBOOKS)


def code_cells(notebook):
    return [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("notebook", LESSONS, ids=[n.name for n in LESSONS])
def test_stored_outputs_come_from_one_clean_top_to_bottom_run(notebook):
    counts = [c["execution_count"] for c in code_cells(notebook)]
    assert counts == list(range(1, len(counts) + 1)), "re-run the notebook top to bottom in a fresh kernel"


@pytest.mark.parametrize("notebook", LESSONS, ids=[n.name for n in LESSONS])
def test_stored_outputs_hold_no_errors_or_warnings(notebook):
    for cell in code_cells(notebook):
        for out in cell["outputs"]:
            assert out["output_type"] != "error", "".join(cell["source"])[:80]
            assert out.get("name") != "stderr", "".join(cell["source"])[:80]


def test_nbval_fails_when_a_stored_output_changes(tmp_path):
    "Run lesson 01 twice under nbval: as stored (passes), and with one stored number changed (fails)."
    name = "01_patch_embeddings.ipynb"
    for copy in ("as_stored", "changed"):
        (tmp_path / copy / "notebooks").mkdir(parents=True)
        (tmp_path / copy / "images").symlink_to(IMAGES)
        shutil.copy(NOTEBOOKS / name, tmp_path / copy / "notebooks" / name)
    changed = tmp_path / "changed" / "notebooks" / name
    nb = json.loads(changed.read_text())
    hits = 0
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out.get("name") == "stdout" and "patches: (1, 256, 588)" in "".join(out["text"]):
                out["text"] = "".join(out["text"]).replace("(1, 256, 588)", "(1, 256, 589)")
                hits += 1
    assert hits == 1
    changed.write_text(json.dumps(nb, indent=1))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # keep the repository's options out of this run

    result = run_python("-m", "pytest", "--nbval", "--nbval-current-env", "-p", "no:cacheprovider",
                        "--nbval-sanitize-with", str(REPO / "tests" / "nbval_sanitize.cfg"),
                        "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), "-q",
                        str(tmp_path / "as_stored"), str(tmp_path / "changed"), cwd=tmp_path)
    summary = result.stdout.strip().splitlines()[-1]
    n_cells = len(code_cells(NOTEBOOKS / name))
    assert result.returncode == 1, result.stdout[-3000:]
    assert summary.startswith(f"1 failed, {2 * n_cells - 1} passed"), summary
    assert "changed/notebooks/01_patch_embeddings.ipynb::Cell" in result.stdout
    assert "(1, 256, 589)" in result.stdout and "(1, 256, 588)" in result.stdout
