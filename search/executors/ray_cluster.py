"""The Ray a run uses: a local Ray started for it, or a running cluster joined with --address.

An address is checked before anything else runs (Ray would retry an unreachable one for
minutes); joining a cluster that uses token authentication without the token is a one-line
error that says how to set it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import ray

from lensnas.search.spec import SpecError

# Tune's own tables off; Ctrl+C handled by the driver (Tune's handler would not tell it fired).
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_SIGINT_HANDLER": "1"}


def check_address(address: str, timeout: float = 10.0) -> None:
    """SpecError at once for an address that is not one, or where nothing listens."""
    head = head_host_port(address)
    if head is None:
        return
    try:
        socket.create_connection(head, timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise SpecError(
            f"--address {address}: cannot reach it ({reason}): is `ray start --head` running there?"
        ) from None


def head_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a --address host:port, None for 'auto'; SpecError for anything else."""
    if address == "auto":
        return None
    if "://" in address:
        raise SpecError(
            f"--address {address}: Ray Client addresses (ray://) are not supported; give the "
            "cluster's host:port, as `ray start --head` prints it, or 'auto' on a node of the "
            "cluster"
        )
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # an IPv6 host is written [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpecError(
            f"--address {address!r}: expected host:port (e.g. 10.0.0.5:6379) or 'auto'"
        )
    return host, int(port)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[str]:
    """Use the running Ray, or start/join one and shut it down afterwards; yields which it is."""
    if ray.is_initialized():
        yield "using the running Ray"
        return
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address is None:
        options["include_dashboard"] = False
    try:
        # Only when joining: processes a local Ray starts would inherit the redirected stderr.
        catch = _stderr_of_ray_core() if address else contextlib.nullcontext(io.StringIO())
        with catch as ray_messages:
            # "local": a new Ray even where `ray start` runs one (joining is what --address is for)
            ray.init(address=address or "local", **options)
    except ConnectionError as error:
        reason = str(error).strip().splitlines()[0]
        if "InvalidAuthToken" in ray_messages.getvalue():
            reason += (
                "; the cluster uses token authentication and this launcher has no valid token: "
                "set RAY_AUTH_MODE=token and the cluster's token (~/.ray/auth_token or "
                "$RAY_AUTH_TOKEN)"
            )
        raise SpecError(f"--address {address}: cannot join the Ray cluster ({reason})") from None
    try:
        yield "started a local Ray" if address is None else f"joined the Ray cluster at {address}"
    finally:
        ray.shutdown()


@contextlib.contextmanager
def quiet_ray_env() -> Iterator[None]:
    """Set QUIET_ENV for the duration of the run."""
    saved = {key: os.environ.get(key) for key in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _stderr_of_ray_core() -> Iterator[io.StringIO]:
    """Catch what Ray's C++ core writes to file descriptor 2 while inside (a connection failure
    repeats a warning every second); shown again afterwards unless the block raised."""
    caught = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+", errors="replace") as capture:
        os.dup2(capture.fileno(), 2)
        raised = True
        try:
            yield caught
            raised = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            caught.write(capture.read())
    if not raised:
        sys.stderr.write(caught.getvalue())
