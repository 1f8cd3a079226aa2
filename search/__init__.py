"""The search engine: study files, Optuna studies, executors, storage and the CLI."""

from lensnas.search.launch import launch
from lensnas.search.spec import SpecError, StudySpec, load_spec

__all__ = ["SpecError", "StudySpec", "launch", "load_spec"]
