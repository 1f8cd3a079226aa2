"""Trial artifacts (weights, architecture spec, diagnostic figures) in an Optuna artifact store.

The store is a :class:`optuna.artifacts.FileSystemArtifactStore` rooted at
:func:`lensnas.search.storage.artifact_root` of the storage URL. Each uploaded file is linked to its
trial by Optuna (system attribute ``artifacts:<id>``, what optuna-dashboard lists) and by the
user attribute ``artifacts`` = ``{filename: artifact id}``, which export and report read.
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.trial import FrozenTrial

from lensnas.search.storage import artifact_root

ARTIFACTS_ATTR = "artifacts"
# Suffixes that mimetypes guesses wrongly (.pt, .ts) or not at all.
MIME_TYPES = {
    ".pt": "application/octet-stream",
    ".ts": "application/octet-stream",
    ".onnx": "application/octet-stream",
    ".md": "text/markdown",
}


def artifact_store(storage_url: str) -> FileSystemArtifactStore:
    """The artifact store of the study storage at ``storage_url`` (folder created if missing)."""
    root = artifact_root(storage_url)
    root.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(root))


def store_trial_artifacts(
    trial: optuna.Trial,
    folder: str | Path,
    storage_url: str | None = None,
    *,
    store: FileSystemArtifactStore | None = None,
) -> dict[str, str]:
    """Upload every file of ``folder`` to the store and link them to ``trial``; {filename: id}.

    The store is ``store`` if given, else the one of ``storage_url``.
    """
    if store is None:
        if storage_url is None:
            raise ValueError("store_trial_artifacts: give storage_url or store")
        store = artifact_store(storage_url)
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    ids = {}
    for path in files:
        ids[path.name] = upload_artifact(
            artifact_store=store,
            file_path=str(path),
            study_or_trial=trial,
            mimetype=MIME_TYPES.get(path.suffix),
        )
    if ids:
        trial.set_user_attr(ARTIFACTS_ATTR, ids)
    return ids


def trial_artifact_ids(trial: FrozenTrial) -> dict[str, str]:
    """The ``{filename: artifact id}`` links of a stored trial (empty if it has none)."""
    ids = trial.user_attrs.get(ARTIFACTS_ATTR)
    return dict(ids) if isinstance(ids, dict) else {}


def download_trial_artifacts(
    trial: FrozenTrial,
    store: FileSystemArtifactStore,
    folder: str | Path,
    names: tuple[str, ...] | None = None,
) -> dict[str, Path]:
    """Download the trial's artifacts (all, or only ``names``) into ``folder``; {filename: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, artifact_id in trial_artifact_ids(trial).items():
        if names is not None and name not in names:
            continue
        path = folder / name
        if path.exists():
            path.unlink()
        download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(path))
        paths[name] = path
    return paths


def read_trial_artifact(
    trial: FrozenTrial, store: FileSystemArtifactStore, name: str
) -> bytes | None:
    """The bytes of one artifact of the trial, or None if the trial has no such file."""
    artifact_id = trial_artifact_ids(trial).get(name)
    if artifact_id is None:
        return None
    with store.open_reader(artifact_id) as reader:
        return reader.read()
