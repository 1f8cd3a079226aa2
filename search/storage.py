"""Optuna storage: SQLAlchemy URLs, the SQLite default, safe printing, artifact folders."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url

from lensnas.spaces.errors import StorageError

DEFAULT_STORAGE = "sqlite:///lensnas.db"
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90
# How to install the Python driver SQLAlchemy wants for a URL scheme (postgresql:// is psycopg 3).
DRIVER_INSTALL = {
    "psycopg": "install the postgres extra: pip install -e '.[postgres]' in the lensnas clone "
               "(or pip install 'psycopg[binary]')",
    "psycopg2": "pip install psycopg2-binary (or use postgresql:// with the postgres extra)",
    "pg8000": "pip install pg8000",
    "mysqldb": "pip install mysqlclient (or use mysql+pymysql:// with pip install pymysql)",
    "pymysql": "pip install pymysql",
}




def parse_url(url: str) -> URL | None:
    """The parsed SQLAlchemy URL, or None when ``url`` is not one."""
    try:
        return make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError, TypeError):
        return None


def sqlite_path(url: str) -> Path | None:
    """The database file of a file-backed SQLite URL, else None."""
    parsed = parse_url(url)
    if parsed is None or parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).expanduser()


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    parsed = parse_url(url)
    if parsed is None:  # not parseable: mask whatever stands between "user:" and the last "@"
        return re.sub(r"^((?:[^:/@]*://)?[^:/@]*):.*@", r"\1:***@", url, flags=re.DOTALL)
    return parsed.render_as_string(hide_password=True)


def _not_a_url(url: str) -> str:
    """Why ``url`` is not a SQLAlchemy URL, with what is allowed (one line)."""
    shown = redact(url)
    name = url.strip()
    if name and name.isprintable() and not any(mark in name for mark in (":", "@")):  # a file name
        return (
            f"storage URL {shown!r} has no scheme: did you mean sqlite:///{name}? "
            "(a SQLAlchemy URL: sqlite:///FILE or postgresql://user:password@host/db)"
        )
    return (
        f"storage URL {shown!r} is not a valid SQLAlchemy URL "
        "(e.g. sqlite:///lensnas.db, postgresql://user:password@host/db)"
    )


def _check_driver(url: str, parsed: URL) -> None:
    """Raise a one-line StorageError when the database or its Python driver is unknown/missing."""
    try:
        dialect = parsed.get_dialect()
    except (sqlalchemy.exc.NoSuchModuleError, sqlalchemy.exc.ArgumentError):
        raise StorageError(
            f"storage URL {redact(url)!r}: unknown database scheme {parsed.drivername!r} "
            "(e.g. sqlite:///lensnas.db, postgresql://user:password@host/db)"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        driver = parsed.get_driver_name()
        module = error.name or driver
        install = DRIVER_INSTALL.get(driver, f"pip install the package of module {module!r}")
        raise StorageError(
            f"storage URL {redact(url)!r}: its driver {driver} is not installed; {install}"
        ) from None


def default_storage_url() -> str:
    """``$LENSNAS_STORAGE`` or ``sqlite:///lensnas.db`` in the current directory."""
    return os.environ.get("LENSNAS_STORAGE", DEFAULT_STORAGE)


def open_storage(url: str, must_exist: bool = False) -> optuna.storages.RDBStorage:
    """An RDB storage for ``url`` with heartbeats (stale trials get failed) and a SQLite busy
    timeout; ``must_exist``: refuse to create a new SQLite file (for commands that only read)."""
    parsed = parse_url(url)
    if parsed is None:
        raise StorageError(_not_a_url(url))
    _check_driver(url, parsed)
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        # Several workers on one SQLite file: wait for the lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 120}
        if sqlite_path(url) is not None:
            try:
                database = sqlite_path(url).resolve()
                folder_exists, file_exists = database.parent.is_dir(), database.is_file()
            except OSError as error:
                raise StorageError(
                    f"storage URL {redact(url)!r}: bad path ({error.strerror})"
                ) from None
            if not folder_exists:
                raise StorageError(
                    f"storage URL {redact(url)!r}: folder {database.parent} does not exist"
                )
            if must_exist and not file_exists:
                raise StorageError(f"storage URL {redact(url)!r}: no such database file {database}")
    else:
        engine_kwargs["pool_pre_ping"] = True
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS,
                )
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as error:
            reason = str(getattr(error, "orig", None) or error).splitlines()[0]
            # Two processes creating the schema of a new database at once: one wins, retry.
            if "already exists" in reason and attempt < 4:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise StorageError(
                f"storage URL {redact(url)!r}: cannot open ({redact_text(reason, url)})"
            ) from None
    raise AssertionError("unreachable")


def redact_text(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (if any) replaced by ***."""
    parsed = parse_url(url)
    password = parsed.password if parsed is not None else None
    return text.replace(password, "***") if password else text


def artifact_root(url: str) -> Path:
    """Folder for trial artifacts: next to a SQLite file, else ``./lensnas-artifacts``."""
    database = sqlite_path(url)
    folder = database.resolve().parent if database is not None else Path.cwd()
    return folder / "lensnas-artifacts"


@contextlib.contextmanager
def claim_lock(url: str) -> Iterator[None]:
    """A cross-process lock for claiming trials: a file lock beside a SQLite database.

    Other backends get no lock (launchers on several hosts may overshoot n_trials by the
    number of launchers minus one).
    """
    database = sqlite_path(url)
    if database is None:
        yield
        return
    lock_path = database.resolve().with_name(database.name + ".claim-lock")
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
