"""Ranking trials and the tables of trials (terminal, JSON, markdown, HTML)."""

from __future__ import annotations

import io
import json

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from lensnas.search.cli import main
from lensnas.search.summary import (
    best_trials,
    compact_value,
    html_table,
    markdown_table,
    print_best,
    print_status,
    trial_header,
    trial_rows,
)


def _study(directions: list[str], values: list[list[float]]) -> optuna.Study:
    study = optuna.create_study(directions=directions)
    for number, trial_values in enumerate(values):
        study.add_trial(create_trial(values=trial_values, params={"x": float(number)},
                                     distributions={"x": FloatDistribution(0, 100)}))
    study.add_trial(create_trial(state=TrialState.FAIL))
    return study


def test_multi_objective_top_k_is_the_pareto_front_then_the_next_fronts():
    # minimise rmse, maximise the second value: fronts {0, 3}, then {1}, then {2}
    values = [[0.1, 5.0], [0.2, 5.0], [0.3, 4.0], [0.05, 1.0]]
    study = _study(["minimize", "maximize"], values)
    assert [t.number for t in best_trials(study, 2)] == sorted(t.number for t in study.best_trials)
    assert [t.number for t in best_trials(study, 3)] == [0, 3, 1]
    assert [t.number for t in best_trials(study, 10)] == [0, 3, 1, 2]  # failed trial left out


def test_single_objective_top_k_follows_the_direction():
    study = _study(["maximize"], [[1.0], [3.0], [2.0]])
    assert [t.number for t in best_trials(study, 2)] == [1, 2]


# --- the terminal tables: compact (fits the terminal), --wide, --json ---------------------------

SHEAR_DISTRIBUTIONS = {
    "depth": IntDistribution(1, 3),
    "width": IntDistribution(4, 64),
    "kernel_size": IntDistribution(3, 7),
    "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
    "loss": CategoricalDistribution(["mse", "huber", "l1"]),
    "normalization": CategoricalDistribution(["none", "batch", "group", "instance"]),
    "activation": CategoricalDistribution(["relu", "gelu", "silu"]),
    "head": CategoricalDistribution(["dense", "gap"]),
    "batch_size": IntDistribution(16, 256),
}
LONG_REASON = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB " + "x" * 200


def _shear_like_study(
    storage: str | None = None, metrics: tuple[str, ...] = ("rmse",)
) -> optuna.Study:
    """A study with the attributes a shear study stores: 10 complete trials, a failed, a pruned."""
    study = optuna.create_study(study_name="shear-table", storage=storage,
                                directions=["minimize"] * len(metrics))
    study.set_user_attr("objective", "shear")
    study.set_user_attr("metrics", list(metrics))
    for n in range(12):
        params = {"depth": 1 + n % 3, "width": 4 * (1 + n), "kernel_size": 3 + 2 * (n % 3),
                  "learning_rate": 1.2345e-4 * (1 + n), "loss": ["mse", "huber", "l1"][n % 3],
                  "normalization": "batch", "activation": ["relu", "gelu", "silu"][n % 3],
                  "head": ["dense", "gap"][n % 2], "batch_size": 64}
        attrs: dict = {"seed": 100 + n, "n_params": 12345 + n}
        for i, key in enumerate(("m1", "m2", "c1", "c2")):
            attrs[key] = (-1) ** (n + i) * (1.234e-3 + n * 1e-5) * 10 ** -(i // 2 * 2)
            attrs[f"{key}_err"] = 4.56e-4 * 10 ** -(i // 2 * 2)
        attrs.update(rmse=1.15e-3 + n * 1.1e-5, rmse_ratio=0.4 + n / 100, abs_m=1e-3 * n,
                     rmse_ratio_object=7.8 + n / 10, noise_0_001_rmse=2.5e-3)
        state, values = TrialState.COMPLETE, [attrs[m] for m in metrics]
        if n == 0:
            attrs["preset"] = "shearnet_cnn"
        if n == 4:
            state, values, attrs = TrialState.FAIL, None, {"fail_reason": LONG_REASON}
        if n == 5:
            state, values, attrs = TrialState.PRUNED, None, {"seed": 105}
        study.add_trial(create_trial(state=state, values=values, params=params,
                                     distributions=SHEAR_DISTRIBUTIONS, user_attrs=attrs))
    return study


def _render(printer, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    printer(console)
    return console.export_text()


@pytest.mark.parametrize("width", [80, 100])
@pytest.mark.parametrize("metrics", [("rmse",), ("rmse", "abs_m")])
def test_status_and_best_tables_fit_the_terminal_and_cut_no_metric(width, metrics):
    study = _shear_like_study(metrics=metrics)
    for printer, trials in [
        (lambda c: print_status(study, c), study.trials),
        (lambda c: print_best(study, c), best_trials(study, 5)),
    ]:
        text = _render(printer, width)
        assert max(len(line) for line in text.splitlines()) <= width
        header_line = next(line for line in text.splitlines() if "┃ trial ┃ state" in line)
        shown = [name.strip() for name in header_line.strip("┃ ").split("┃")][2:-1]
        assert shown[: len(metrics)] == list(metrics)  # the study's metrics first, never left out
        assert "params" in header_line and "seconds" not in header_line
        for row in trial_rows(trials, shown, wide=False):  # every trial, state, metric cell whole
            line = next(line for line in text.splitlines() if line.startswith(f"│ {row[0]:>5} │"))
            assert [cell.strip() for cell in line.strip("│ ").split("│")][:-1] == row[:-1]
        assert "--wide" in text  # the columns left out are named, with how to see them
    at_100 = _render(lambda c: print_status(study, c), 100)
    assert "m1" in at_100 and "±" in at_100 and "0.00115" in at_100


def test_compact_rows_show_varying_params_and_a_short_reason():
    study = _shear_like_study()
    header = trial_header(["rmse"], wide=False)
    rows = trial_rows(study.trials, ["rmse"], wide=False)
    assert header == ["trial", "state", "rmse", "params / reason"]
    assert rows[0][:3] == ["0", "COMPLETE", "0.00115"]
    assert rows[0][3].startswith("(preset shearnet_cnn) depth=1 width=4 kernel_size=3")
    assert "normalization" not in rows[0][3] and "batch_size" not in rows[0][3]  # the same in all
    assert rows[4][1] == "FAIL" and rows[4][3].startswith("RuntimeError: CUDA out of memory")
    assert "…" in rows[4][3] and len(rows[4][3]) < 200
    wide = trial_rows(study.trials, ["rmse"], wide=True)
    assert LONG_REASON in wide[4][-1] and "normalization=batch" in wide[0][-1]
    assert trial_header(["rmse"]) == ["trial", "state", "seconds", "rmse", "params / reason"]


@pytest.mark.parametrize(("value", "error", "text"), [
    (-0.00703, 0.0021, "-0.00703±0.0021"),
    (1.15e-5, None, "1.15e-5"),
    (12345, None, "12345"),
    (0.41, 0.004, "0.41±0.004"),
    (2.0e6, 3.1e4, "2e6±3.1e4"),
    (None, None, ""),
    (float("nan"), None, "nan"),
])
def test_compact_value(value, error, text):
    assert compact_value(value, error) == text


def test_cli_status_wide_and_json(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/s.db"
    _shear_like_study(storage)
    assert main(["status", "shear-table", "--storage", storage, "--wide"]) == 0
    wide = capsys.readouterr().out
    for column in ("seconds", "c2", "rmse_ratio_object", "normalization=batch", LONG_REASON[:40]):
        assert column in wide

    assert main(["status", "shear-table", "--storage", storage, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["study"] == "shear-table" and document["metrics"] == ["rmse"]
    assert document["directions"] == ["minimize"]
    first, failed, pruned = document["trials"][0], document["trials"][4], document["trials"][5]
    assert first["number"] == 0 and first["state"] == "COMPLETE"
    assert first["values"] == [pytest.approx(1.15e-3)] and first["params"]["loss"] == "mse"
    assert first["metrics"]["m1_err"] == pytest.approx(4.56e-4) and "seed" not in first["metrics"]
    assert first["preset"] == "shearnet_cnn"
    assert failed["state"] == "FAIL" and failed["values"] is None
    assert failed["fail_reason"] == LONG_REASON
    assert pruned["state"] == "PRUNED" and pruned["metrics"] == {}

    with pytest.raises(SystemExit) as exit_info:  # argparse: one usage line and the error, status 2
        main(["status", "shear-table", "--storage", storage, "--json", "--wide"])
    assert exit_info.value.code == 2
    assert "--wide: not allowed with argument --json" in capsys.readouterr().err


def test_markdown_and_html_tables_escape_their_cells():
    header = ["trial", "params / reason"]
    rows = [["0", "a|b <script> & x"], ["1", "two\nlines"]]
    assert markdown_table(header, rows) == (
        "| trial | params / reason |\n|---|---|\n| 0 | a\\|b <script> & x |\n| 1 | two lines |\n"
    )
    table = html_table(header, rows, table_id="top-trials")
    assert table.startswith('<table id="top-trials"><thead><tr><th>trial</th>')
    assert "<td>a|b &lt;script&gt; &amp; x</td>" in table and "<script>" not in table
    assert html_table(header, []).startswith("<table><thead>")
