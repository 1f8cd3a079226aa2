"""The documentation: the MkDocs site builds with no warning (API reference included), and the
tutorial notebook runs from its first cell to its last on a real kernel and measures shear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPOSITORY = Path(__file__).parents[1]
NOTEBOOK = REPOSITORY / "docs" / "tutorials" / "quickstart.ipynb"


def test_the_site_builds_with_no_warning(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        check=False, cwd=REPOSITORY, capture_output=True, text=True, timeout=300, env=env,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "WARNING" not in run.stderr, run.stderr[-4000:]
    for page in ("index.html", "tutorials/quickstart/index.html", "shear/index.html",
                 "writing-an-objective/index.html"):
        assert (site / page).is_file(), page
    # the API reference is generated from the sources, under the names they install as
    api = {name: (site / "api" / name / "index.html").read_text(encoding="utf-8")
           for name in ("search", "objectives", "spaces", "results")}
    assert 'id="lensnas.search.launch.launch"' in api["search"]
    assert 'id="lensnas.objectives.Objective"' in api["objectives"]
    assert 'id="lensnas.spaces.load"' in api["spaces"]
    assert 'id="lensnas.search.results.predict.predict"' in api["results"]
    assert (site / "images" / "quickstart.png").is_file()


def test_the_tutorial_notebook_runs_and_measures_shear(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs for cell in code), "commit the notebook with its outputs cleared"

    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]

    (result_cell,) = [cell for cell in code if "result" in cell.metadata.get("tags", [])]
    printed = "".join(o.get("text", "") for o in result_cell.outputs if o.output_type == "stream")
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["trials"] == 8
    # the exported network, on 300 galaxies it never saw, measures shear: far better than
    # answering g = 0, with a response (slope of measured against true g) near 1
    assert result["rmse_new"] < 0.25 * result["rmse_zero"], result
    assert 0.8 < result["slope_g1"] < 1.2 and 0.8 < result["slope_g2"] < 1.2, result
    # and about as well as on its own test set
    assert result["rmse_new"] < 3 * result["best_test_rmse"], result
    # the notebook removed its temporary folder; it wrote nothing where it ran
    assert not any(tmp_path.iterdir())
