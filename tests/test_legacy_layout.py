"""A study and an export made by lensnas before the domain wings (commit f308a7e, stored in
tests/data/legacy_f308a7e) load, report, re-export and resume unchanged with today's layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from lensnas import spaces
from lensnas.search.cli import main
from lensnas.search.results.report import build_report

LEGACY = Path(__file__).parent / "data" / "legacy_f308a7e"


@pytest.fixture()
def legacy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the stored study, its artifacts and its export (the repository stays as is)."""
    folder = tmp_path / "legacy"
    shutil.copytree(LEGACY, folder)
    monkeypatch.chdir(folder)
    return folder


def storage(folder: Path) -> str:
    return f"sqlite:///{folder / 'legacy.db'}"


def test_old_export_loads_and_gives_the_same_numbers(legacy: Path) -> None:
    check = np.load(legacy / "export_check.npz")
    model = spaces.load(legacy / "export" / "trial-0")
    with torch.no_grad():
        output = model(torch.from_numpy(check["input"])).numpy()
    np.testing.assert_allclose(output, check["output"], rtol=0, atol=1e-7)


def test_old_study_reports_and_reexports_the_same_network(legacy: Path) -> None:
    assert main(["status", "legacy-shear", "--storage", storage(legacy)]) == 0
    study = optuna.load_study(study_name="legacy-shear", storage=storage(legacy))
    html = build_report(study, storage(legacy))
    assert 'id="top-trials"' in html and "legacy-shear" in html
    assert main(["export", "legacy-shear", "--storage", storage(legacy), "--top", "1",
                 "-o", str(legacy / "again")]) == 0
    check = np.load(legacy / "export_check.npz")
    with torch.no_grad():
        output = spaces.load(legacy / "again" / "trial-0")(torch.from_numpy(check["input"])).numpy()
    np.testing.assert_allclose(output, check["output"], rtol=0, atol=1e-7)


def test_old_study_resumes_with_its_dataset_key(legacy: Path) -> None:
    """Its data settings hash to the same dataset key, so launch adds a trial instead of
    refusing the study as one of other data."""
    key = optuna.load_study(study_name="legacy-shear", storage=storage(legacy)).user_attrs["dataset_key"]
    assert main(["launch", "legacy.toml", "--storage", storage(legacy), "--n-trials", "3",
                 "--cache-dir", str(legacy / "cache"), "--quiet"]) == 0
    study = optuna.load_study(study_name="legacy-shear", storage=storage(legacy))
    assert study.user_attrs["dataset_key"] == key
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3


def test_old_public_import_paths_still_work() -> None:
    from lensnas.objectives.reference import measure
    from lensnas.objectives.shear.reference import measure as moved_measure
    from lensnas.search.predict import predict
    from lensnas.search.results.predict import predict as moved_predict

    assert measure is moved_measure and predict is moved_predict
