"""The distribution installs one import package, lensnas, and nothing generic top-level."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPOSITORY = Path(__file__).parents[1]


def test_the_wheel_holds_only_the_lensnas_namespace(tmp_path):
    # built from a copy: setuptools writes its build/ folder next to the sources
    source = tmp_path / "source"
    shutil.copytree(REPOSITORY, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".*cache*", "lensnas-artifacts", "*.db"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("lensnas-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"lensnas"}
    for package in ("search", "spaces", "objectives"):
        assert f"lensnas/{package}/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lensnas = lensnas.search.cli:run" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_only_the_namespaced_imports_work_outside_the_repository(tmp_path):
    code = ("import importlib.util as u; import lensnas.spaces as s; print(s.load.__module__, "
            "[u.find_spec(n) is None for n in ('spaces', 'objectives', 'search')])")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=True)
    assert run.stdout.split() == ["lensnas.spaces.loading", "[True,", "True,", "True]"]
