"""``lensnas dashboard``: optuna-dashboard on a study storage, with its trials' artifacts."""

from __future__ import annotations

import sys
from typing import TextIO

from lensnas.search.artifacts import artifact_store
from lensnas.search.spec import SpecError
from lensnas.search.storage import artifact_root, open_storage, redact

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def dashboard_url(host: str, port: int) -> str:
    """The URL to open for a server bound to ``host``:``port``."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown
    return f"http://{shown}:{port}/dashboard/"


def serve(
    storage_url: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, out: TextIO | None = None
) -> None:
    """Serve optuna-dashboard for ``storage_url`` (blocks until interrupted); prints the URL."""
    from optuna_dashboard import run_server

    if not 0 <= port <= 65535:
        raise SpecError(f"--port: must be 0-65535 (0: any free port), got {port}")
    storage = open_storage(storage_url)
    store = artifact_store(storage_url)
    out = out or sys.stdout
    print(
        f"lensnas dashboard: {redact(storage_url)} (artifacts in {artifact_root(storage_url)}) at "
        f"{dashboard_url(host, port)} (Ctrl-C to stop)",
        file=out,
        flush=True,
    )
    try:
        run_server(storage, host=host, port=port, artifact_store=store)
    except OSError as error:
        raise SpecError(
            f"--port: cannot listen on {host}:{port} ({error.strerror or error})"
        ) from None
