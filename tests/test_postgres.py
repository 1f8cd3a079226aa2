"""PostgreSQL, the multi-node storage: a Ray study with 2 trials at a time, passwords never shown.

The server is the one of ``LENSNAS_TEST_POSTGRES_URL`` when set; otherwise the test set-up starts
a local one with ``.ci/postgres.sh`` (Debian's PostgreSQL; under CI it also installs it). Skipped
only outside CI on a machine without PostgreSQL; under CI that is a failure. The URLs are used as
the README writes them, ``postgresql://user:password@host/db`` (psycopg 3, the "postgres" extra);
``postgresql+psycopg2://`` works too.
"""

from __future__ import annotations

import glob
import os
import subprocess
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from lensnas.search.cli import main
from lensnas.search.study import trial_seed
from tests.conftest import in_ci
from tests.ray_fixtures import load, ray_session, write_ray_study

__all__ = ["ray_session"]  # the module-scoped fixture, imported for pytest

POSTGRES_SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "postgres.sh"


@pytest.fixture(scope="module")
def postgres_url() -> str:
    url = os.environ.get("LENSNAS_TEST_POSTGRES_URL", "")
    if not url:
        if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and not in_ci():
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql), "
                        "and LENSNAS_TEST_POSTGRES_URL is unset")
        started = subprocess.run(["bash", str(POSTGRES_SCRIPT)], capture_output=True, text=True,
                                 timeout=600, check=False)
        if started.returncode != 0:
            reason = started.stderr.strip()[-2000:]
            pytest.fail(f"{POSTGRES_SCRIPT} could not start PostgreSQL: {reason}")
        url = started.stdout.strip().removeprefix("export LENSNAS_TEST_POSTGRES_URL=")
    parsed = make_url(url)
    assert parsed.password, "the test URL must hold a password (to check it is never shown)"
    # the scheme as the README writes it, whatever driver the given URL named
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def test_ray_study_on_postgres_with_two_trials_at_a_time(
    postgres_url, tmp_path, monkeypatch, ray_session, capsys
):
    monkeypatch.chdir(tmp_path)  # artifacts of a non-SQLite storage go to ./lensnas-artifacts
    name = f"pg-{uuid.uuid4().hex[:8]}"
    study_file = write_ray_study(tmp_path, name, n_trials=2, presets='"shearnet_cnn"')
    password = make_url(postgres_url).password

    args = ["launch", str(study_file), "--storage", postgres_url, "--executor", "ray"]
    assert main([*args, "--max-concurrent", "2"]) == 0
    out, err = capsys.readouterr()
    assert password not in out + err
    assert f"study {name} in postgresql://{make_url(postgres_url).username}:***@" in err

    study = load(postgres_url, name)
    first, second = study.trials
    assert [first.state, second.state] == [TrialState.COMPLETE] * 2
    assert first.datetime_start < second.datetime_complete
    assert second.datetime_start < first.datetime_complete  # they ran at the same time
    assert first.user_attrs["preset"] == "shearnet_cnn"
    for trial in study.trials:
        assert trial.user_attrs["executor"] == "ray"
        assert trial.value == trial.user_attrs["rmse"] and "m1" in trial.user_attrs
        assert sorted(trial.intermediate_values) == [1, 2]
        assert trial.user_attrs["seed"] == trial_seed(3, trial.number)
        assert (tmp_path / "lensnas-artifacts" / name / f"trial-{trial.number}").is_dir()
    assert study.user_attrs["objective"] == "shear"

    assert main([*args, "--quiet"]) == 0  # done already: nothing runs
    assert len(load(postgres_url, name).trials) == 2

    # what the other commands print or write never holds the password either
    assert main(["status", name, "--storage", postgres_url]) == 0
    assert main(["report", name, "--storage", postgres_url, "-o", str(tmp_path / "r.html")]) == 0
    best = str(tmp_path / "best")
    assert main(["export", name, "--storage", postgres_url, "--top", "1", "-o", best]) == 0
    out, err = capsys.readouterr()
    assert password not in out + err
    assert password not in (tmp_path / "r.html").read_text()
    for file in (tmp_path / "best").rglob("*"):
        if file.suffix in (".md", ".json"):
            assert password not in file.read_text()


def test_wrong_postgres_password_is_one_line_without_it(postgres_url, tmp_path, capsys):
    wrong = make_url(postgres_url).set(password="not-the-password-42")
    url = wrong.render_as_string(hide_password=False)
    study_file = write_ray_study(tmp_path, "pg-wrong")
    assert main(["launch", str(study_file), "--storage", url, "--executor", "ray"]) == 2
    out, err = capsys.readouterr()
    assert "not-the-password-42" not in out + err
    assert err.count("\n") == 1 and "cannot open" in err and "***" in err


def test_psycopg2_urls_open_the_same_database(postgres_url):
    from lensnas.search.storage import open_storage

    name = f"pg2-{uuid.uuid4().hex[:8]}"
    psycopg2_url = make_url(postgres_url).set(drivername="postgresql+psycopg2")
    optuna.create_study(
        study_name=name, storage=open_storage(psycopg2_url.render_as_string(hide_password=False))
    )
    summaries = optuna.get_all_study_summaries(open_storage(postgres_url))
    assert name in [s.study_name for s in summaries]
    optuna.delete_study(study_name=name, storage=open_storage(postgres_url))
