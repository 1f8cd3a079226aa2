"""Moved: applying an exported network lives in :mod:`lensnas.search.results.predict`.

This module re-exports :func:`predict` so that ``lensnas.search.predict.predict``, as written
before the results wing (lensnas 0.1), keeps working.
"""

from lensnas.search.results.predict import predict

__all__ = ["predict"]
