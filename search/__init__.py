"""The search engine: study files, Optuna studies, executors, storage and the CLI."""

from search.launch import launch
from search.spec import SpecError, StudySpec, load_spec

__all__ = ["SpecError", "StudySpec", "launch", "load_spec"]
