"""Storage URLs: what a user mistypes is reported on one line, with passwords masked."""

from __future__ import annotations

import sys

import optuna
import pytest

from lensnas.search.cli import main
from lensnas.search.storage import StorageError, open_storage, redact


@pytest.mark.parametrize(("url", "shown"), [
    ("lensnas.db", "lensnas.db"),  # not a URL, but nothing in it is secret
    ("postgresql://u:topsecret@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:topsecret@h:notaport/db", "postgresql://u:***@h:notaport/db"),
    ("u:topsecret@host/db", "u:***@host/db"),
    ("sqlite:///x.db", "sqlite:///x.db"),
])
def test_redact_masks_only_the_password(url, shown):
    assert redact(url) == shown


def test_a_storage_without_scheme_is_named_with_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["status", "some-study", "--storage", "lensnas.db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'lensnas.db'" in err and "***" not in err
    assert "did you mean sqlite:///lensnas.db?" in err
    assert not (tmp_path / "lensnas.db").exists()


def test_a_missing_driver_is_one_line_naming_the_url_and_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg 3 were not installed
    url = "postgresql://lensnas:topsecret@127.0.0.1:1/db"
    assert main(["status", "some-study", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "topsecret" not in err
    assert "'postgresql://lensnas:***@127.0.0.1:1/db'" in err
    assert "driver psycopg is not installed" in err and "pip install -e '.[postgres]'" in err


def test_an_unknown_scheme_is_one_line(capsys):
    assert main(["status", "some-study", "--storage", "nosuchdb://u:topsecret@h/db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "topsecret" not in err
    assert "unknown database scheme 'nosuchdb'" in err and "postgresql://" in err


def test_postgresql_urls_load_psycopg_3():  # the dev extra installs the postgres extra
    with pytest.raises(StorageError) as error:  # the driver loads; only the server is missing
        open_storage("postgresql://u:topsecret@127.0.0.1:1/db")
    assert "cannot open" in str(error.value) and "driver" not in str(error.value)


def test_an_existing_sqlite_file_opens(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="s", storage=url)
    storage = open_storage(url, must_exist=True)
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["s"]
