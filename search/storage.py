"""Optuna storage: SQLAlchemy URLs, the SQLite default, safe printing, artifact folders."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

DEFAULT_STORAGE = "sqlite:///lensnas.db"
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90


class StorageError(RuntimeError):
    """A storage URL that is malformed or cannot be reached (message never shows a password)."""


def redact(url: str) -> str:
    """The URL with any password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a URL too malformed to parse: show only its scheme
        return url.split("://", 1)[0] + "://***" if "://" in url else "***"


def default_storage_url() -> str:
    """``$LENSNAS_STORAGE`` or ``sqlite:///lensnas.db`` in the current directory."""
    return os.environ.get("LENSNAS_STORAGE", DEFAULT_STORAGE)


def open_storage(url: str, must_exist: bool = False) -> optuna.storages.RDBStorage:
    """An RDB storage for ``url`` with heartbeats (stale trials get failed) and a SQLite busy
    timeout; ``must_exist``: refuse to create a new SQLite file (for commands that only read)."""
    try:
        parsed = make_url(url)
    except Exception:
        raise StorageError(f"storage URL {redact(url)!r} is not a valid SQLAlchemy URL (e.g. sqlite:///lensnas.db, postgresql://user@host/db)") from None
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        # Several workers on one SQLite file: wait for the lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 120}
        if parsed.database and parsed.database != ":memory:":
            try:
                database = Path(parsed.database).expanduser().resolve()
                folder_exists, file_exists = database.parent.is_dir(), database.is_file()
            except OSError as error:
                raise StorageError(f"storage URL {redact(url)!r}: bad path ({error.strerror})") from None
            if not folder_exists:
                raise StorageError(f"storage URL {redact(url)!r}: folder {database.parent} does not exist")
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
            raise StorageError(f"storage URL {redact(url)!r}: cannot open ({redact_text(reason, url)})") from None
    raise AssertionError("unreachable")


def redact_text(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (if any) replaced by ***."""
    try:
        password = make_url(url).password
    except Exception:
        return text
    return text.replace(password, "***") if password else text


def artifact_root(url: str) -> Path:
    """Folder for trial artifacts: next to a SQLite file, else ``./lensnas-artifacts``."""
    try:
        parsed = make_url(url)
    except Exception:
        return Path("lensnas-artifacts").resolve()
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return Path(parsed.database).expanduser().resolve().parent / "lensnas-artifacts"
    return Path("lensnas-artifacts").resolve()


def claim_lock(url: str):
    """A cross-process lock for claiming trials: a file lock beside a SQLite database.

    Other backends get no lock (launchers on several hosts may overshoot n_trials by the
    number of launchers minus one).
    """
    import contextlib
    import fcntl

    try:
        parsed = make_url(url)
    except Exception:
        return contextlib.nullcontext()
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return contextlib.nullcontext()
    lock_path = Path(parsed.database).expanduser().resolve().with_name(Path(parsed.database).name + ".claim-lock")

    @contextlib.contextmanager
    def locked():
        with open(lock_path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    return locked()
