"""On-disk cache of arrays keyed by a hash of the configuration that produced them.

Each entry is a folder ``<root>/<kind>-<hash>/`` of ``.npy`` files plus ``manifest.json``
holding the configuration and a SHA-256 checksum per file. Entries are written to a
temporary folder and renamed into place, built under a file lock (two processes asking
for the same entry build it once), and verified on load: a truncated or tampered entry
is reported, removed and rebuilt. Loaded arrays are memory-mapped, read-only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("lensnas.cache")

MANIFEST = "manifest.json"


def config_hash(config: Any) -> str:
    """A short stable hash of a JSON-serialisable configuration."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``explicit``, else ``$LENSNAS_CACHE_DIR``, else ``~/.cache/lensnas``."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("LENSNAS_CACHE_DIR"):
        return Path(os.environ["LENSNAS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lensnas"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class CorruptCache(Exception):
    """A cache entry whose files do not match their manifest."""


def entry_path(root: Path, kind: str, config: Any) -> Path:
    return Path(root) / f"{kind}-{config_hash(config)}"


def load_entry(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Verify and memory-map the arrays of one entry; raises CorruptCache on any mismatch."""
    manifest_file = path / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptCache(f"{manifest_file}: unreadable manifest ({error})") from None
    arrays = {}
    for name, checksum in files.items():
        file = path / f"{name}.npy"
        if not file.is_file():
            raise CorruptCache(f"{file}: missing")
        if file_sha256(file) != checksum:
            raise CorruptCache(f"{file}: checksum mismatch (truncated or modified)")
        try:
            arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CorruptCache(f"{file}: unreadable ({error})") from None
    return arrays, manifest.get("meta", {})


def _write_entry(path: Path, arrays: dict[str, np.ndarray], config: Any, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        files = {}
        for name, array in arrays.items():
            file = staging / f"{name}.npy"
            np.save(file, np.ascontiguousarray(array), allow_pickle=False)
            files[name] = file_sha256(file)
        manifest = {"config": config, "files": files, "meta": meta}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_arrays(
    root: Path,
    kind: str,
    config: Any,
    build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
) -> tuple[dict[str, np.ndarray], dict[str, Any], bool]:
    """Load the entry for ``(kind, config)`` or build and store it.

    ``build`` returns ``(arrays, meta)``. Returns ``(arrays, meta, hit)`` where ``hit``
    says whether the entry was already on disk and valid.
    """
    path = entry_path(root, kind, config)
    with _locked(path):
        if path.exists():
            try:
                arrays, meta = load_entry(path)
                logger.info("cache hit: %s %s", kind, path)
                return arrays, meta, True
            except CorruptCache as error:
                logger.warning("corrupt cache entry, rebuilding: %s", error)
                shutil.rmtree(path, ignore_errors=True)
        logger.info("cache miss: building %s %s", kind, path)
        arrays, meta = build()
        _write_entry(path, arrays, config, meta)
        loaded, meta = load_entry(path)
        return loaded, meta, False
