"""MkDocs hook: let the API reference read lensnas's sources as the package they install as.

The folders search/, spaces/ and objectives/ install as lensnas.search, lensnas.spaces and
lensnas.objectives (pyproject.toml, package-dir), and an editable install maps them with an
import hook that griffe, which reads sources without importing them, cannot follow. Before
the build this hook lays out a temporary folder ``lensnas/`` whose entries link to those
folders and gives it to mkdocstrings' Python handler as its search path.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority

PACKAGES = ("search", "spaces", "objectives")

_folder: Path | None = None


@event_priority(100)  # before mkdocstrings reads its handlers' configuration
def on_config(config):
    global _folder
    repository = Path(config.config_file_path).resolve().parent
    _folder = Path(tempfile.mkdtemp(prefix="lensnas-api-"))
    (_folder / "lensnas").mkdir()
    for package in PACKAGES:
        (_folder / "lensnas" / package).symlink_to(repository / package, target_is_directory=True)
    handlers = config.plugins["mkdocstrings"].config["handlers"]
    handlers.setdefault("python", {})["paths"] = [str(_folder)]
    return config


def on_shutdown():
    if _folder is not None:
        shutil.rmtree(_folder, ignore_errors=True)
