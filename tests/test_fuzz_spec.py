"""Hostile study files never produce a traceback: each gets one line naming the file and key."""

from __future__ import annotations

import string
import tomllib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lensnas.search.spec import SpecError, load_spec
from tests.conftest import TINY_SHEAR_STUDY

BASE = TINY_SHEAR_STUDY.format(name="fuzz", n_trials=2, epochs=1, pruner="none", objective_extra="")
BASE_TABLES = tomllib.loads(BASE)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["", "tpe", "shear", "max", "ü∆\u202e", "1e309"]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _toml_value(value) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + " }"


def _render(tables: dict) -> str:
    lines = []
    for table, entries in tables.items():
        if not isinstance(entries, dict):
            lines.append(f'"{table}" = {_toml_value(entries)}')
            continue
        lines.append(f'["{table}"]')
        lines += [f'"{k}" = {_toml_value(v)}' for k, v in entries.items()]
    return "\n".join(lines) + "\n"


@st.composite
def mutated_studies(draw) -> str:
    tables = {t: dict(e) for t, e in BASE_TABLES.items()}
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "delete", "add", "drop_table"]))
        table = draw(st.sampled_from(sorted(tables)))
        if action == "drop_table":
            tables.pop(table)
            if not tables:
                break
            continue
        keys = sorted(tables[table]) or ["x"]
        key = draw(st.sampled_from(keys)) if action != "add" else draw(st.text(string.ascii_letters + "_", min_size=1, max_size=10))
        if action == "delete":
            tables[table].pop(key, None)
        else:
            tables[table][key] = draw(values)
    return _render(tables)


raw_files = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    mutated_studies().map(str.encode),
)


def _check(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    try:
        load_spec(path)
    except SpecError as error:
        message = str(error)
        assert message.startswith(f"{path}: ") and "\n" not in message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=raw_files)
def test_hostile_files_give_one_line_errors(tmp_path, content):
    _check(tmp_path / "study.toml", content)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=mutated_studies())
def test_mutated_valid_studies_give_one_line_errors(tmp_path, content):
    _check(tmp_path / "study.toml", content.encode())
