"""``lensnas dashboard``: optuna-dashboard on a study storage, with its trials' artifacts."""

from __future__ import annotations

import socket
import sys
from typing import Any, TextIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from lensnas.search.artifacts import artifact_store
from lensnas.search.storage import artifact_root, open_storage, redact
from lensnas.spaces.errors import OptionError

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
    """Serve optuna-dashboard for ``storage_url`` (blocks until interrupted); prints the URL.

    The storage must exist already (a misspelled SQLite file is refused, not created) and the
    port is bound before anything is printed, so a busy port is one error line.
    """
    from optuna_dashboard import wsgi

    if not 0 <= port <= 65535:
        raise OptionError(f"--port: must be 0-65535 (0: any free port), got {port}")
    storage = open_storage(storage_url, must_exist=True)
    store = artifact_store(storage_url)
    try:
        server = make_server(host, port, wsgi(storage, artifact_store=store))
    except OSError as error:
        raise OptionError(
            f"--host {host} --port {port}: cannot listen ({error.strerror or error}); "
            "choose another --port (0: any free port) or --host"
        ) from None
    out = out or sys.stdout
    with server:
        print(
            f"lensnas dashboard: {redact(storage_url)} (artifacts in {artifact_root(storage_url)}) "
            f"at {dashboard_url(host, server.server_port)} (Ctrl-C to stop)",
            file=out,
            flush=True,
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # Ctrl-C: the normal way to stop it
            print("lensnas dashboard: stopped", file=out, flush=True)


class _Handler(WSGIRequestHandler):
    """Request handler that logs without reverse DNS look-ups of clients."""

    def address_string(self) -> str:
        return str(self.client_address[0])


class _IPv6Server(WSGIServer):
    address_family = socket.AF_INET6


def make_server(host: str, port: int, app: Any, handler_class: type = _Handler) -> WSGIServer:
    """A bound wsgiref server for ``app`` (IPv6 when ``host`` is an IPv6 address)."""
    server_class = _IPv6Server if ":" in host else WSGIServer
    server = server_class((host.strip("[]"), port), handler_class)
    server.set_app(app)
    return server
