"""The HTML report: self-contained (no network), with the named figures and tables."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest

from lensnas.search.results.comparison import study_baselines
from lensnas.search.results.report import build_report, write_report
from lensnas.search.summary import best_trials
from tests.test_export import TinyStudy, tiny_shear_study

REMOTE = re.compile(
    r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.IGNORECASE
)


@pytest.fixture(scope="module")
def shear(tmp_path_factory) -> TinyStudy:
    return tiny_shear_study(tmp_path_factory)


@pytest.fixture(scope="module")
def report(shear, tmp_path_factory) -> str:
    """``lensnas report tiny5`` with the default output name, run in a fresh folder."""
    from lensnas.search.cli import main

    workdir = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        assert main(["report", "tiny5", "--storage", shear.url]) == 0
    return (workdir / "tiny5-report.html").read_text(encoding="utf-8")


def test_report_is_self_contained(report):
    assert report.startswith("<!DOCTYPE html>")
    assert REMOTE.search(report) is None  # no script, style or image from the network
    assert len(report) > 3_000_000 and "Plotly.newPlot" in report  # plotly.js itself is inline


def test_report_has_the_named_figures(report):
    for div in (
        "optimization-history-0",
        "parallel-coordinates-0",
        "intermediate-values-0",
        "bias-comparison-0",
    ):
        assert f'id="{div}"' in report, div
    for section in (
        "summary",
        "top-trials",
        "optimization-history",
        "param-importances",
        "parallel-coordinates",
        "intermediate-values",
        "reference-comparison",
        "diagnostics",
    ):
        assert f'<section id="{section}">' in report, section
    assert 'id="param-importances-0"' in report or "too few completed trials" in report
    assert 'id="diagnostics-figure"' in report and 'src="data:image/png;base64,' in report
    assert 'id="pareto-front"' not in report  # single-objective study


def test_report_tables_show_metrics_with_errors_and_the_reference(shear, report):
    best = best_trials(shear.study, 1)[0]
    assert f"<td>{best.number}</td>" in report
    assert f"± {best.user_attrs['m1_err']:.1e}" in report
    baselines = study_baselines(shear.study.user_attrs)
    own = [b for b in baselines if not b.conditions]
    # HSM has no response: no per-galaxy row; then the Cramér-Rao bound
    assert [b.key for b in own] == ["reference", "bound"]
    assert {"rmse", "m1", "m1_err", "c2"} <= set(own[0].metrics)
    assert 'id="reference-table"' in report and "<td>hsm, mean response</td>" in report
    assert f"<td>network (trial {best.number})</td>" in report
    assert "what it is" in report  # every row says in words what it is


def test_report_compares_network_and_reference_across_noise_levels(shear, report):
    attrs = best_trials(shear.study, 1)[0].user_attrs
    at_noise = attrs["noise_levels"]["0.001"]  # stored together, not as prefixed keys
    assert {"rmse", "m1", "m1_err", "rmse_ratio"} <= set(at_noise)
    assert not any(key.startswith("noise_0") for key in attrs)
    baselines = study_baselines(shear.study.user_attrs)
    noisy = [b for b in baselines if b.conditions == {"noise_sigma": 0.001}]
    own = [b for b in baselines if not b.conditions]
    assert noisy[0].metrics["rmse"] > own[0].metrics["rmse"]  # HSM at sigma 1e-3 vs the study's 1e-5
    assert at_noise["rmse_ratio"] == pytest.approx(at_noise["rmse"] / noisy[0].metrics["rmse"])
    assert '<section id="noise-levels">' in report and 'id="noise-levels-0"' in report
    assert "<td>1e-05</td>" in report and "<td>0.001</td>" in report
    assert "network RMSE / bound" in report and "Cramér-Rao bound" in report
    assert at_noise["rmse_over_crb"] == pytest.approx(at_noise["rmse"] / at_noise["crb_rmse"])


def test_multi_objective_report_has_a_pareto_front_and_handles_few_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'mo.db'}"
    study = optuna.create_study(
        study_name="mo", storage=storage, directions=["minimize", "minimize"]
    )
    study.set_user_attr("metrics", ["rmse", "n_params"])
    study.optimize(
        lambda t: (t.suggest_float("x", 0, 1) ** 2, (t.suggest_float("y", 0, 1) - 1) ** 2),
        n_trials=1,
    )
    text = build_report(study, storage)
    assert "too few completed trials" in text or "need at least 2" in text
    study.optimize(
        lambda t: (t.suggest_float("x", 0, 1) ** 2, (t.suggest_float("y", 0, 1) - 1) ** 2),
        n_trials=6,
    )
    path = write_report(study, tmp_path / "mo.html", storage)
    text = Path(path).read_text()
    assert 'id="pareto-front-0"' in text and 'id="optimization-history-1"' in text
    assert "Optuna records intermediate values for single-objective studies only" in text
    assert "stored no diagnostic figure" in text
    assert REMOTE.search(text) is None


def test_report_of_an_empty_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'empty.db'}"
    study = optuna.create_study(study_name="empty", storage=storage)
    text = build_report(study, storage)
    assert text.count("No completed trial yet.") >= 4


FIGURES = ("optimization-history-0", "intermediate-values-0", "bias-comparison-0",
           "noise-levels-0", "parallel-coordinates-0")


def _rendered_figures(report_text: str, tmp_path: Path) -> dict[str, str]:
    """The report as headless Chromium renders it (plotly drawn), split by figure id."""
    import os
    import shutil
    import subprocess

    from tests.test_dashboard import CHROMIUM_FLAGS

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI must install it: apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = tmp_path / "report.html"
    page.write_text(report_text, encoding="utf-8")
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=20000", page.as_uri()],
        check=False, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    starts = sorted((dom.find(f'id="{name}"'), name) for name in FIGURES if f'id="{name}"' in dom)
    return {
        name: dom[start:(starts[i + 1][0] if i + 1 < len(starts) else len(dom))]
        for i, (start, name) in enumerate(starts)
    }


def _texts(fragment: str, css_class: str) -> list[str]:
    return re.findall(rf'<text class="{css_class}"[^>]*>([^<]*)</text>', fragment)


def test_report_figures_render_with_legends_and_axis_titles(shear, report, tmp_path):
    """Drawn by plotly.js in a real browser: every figure has named axes and a legend whose
    entries are the network, the reference estimators and the trials."""
    figures = _rendered_figures(report, tmp_path)
    assert set(FIGURES) <= set(figures), sorted(figures)
    bias = figures["bias-comparison-0"]
    best = best_trials(shear.study, 1)[0]
    legend = _texts(bias, "legendtext")
    assert f"network (trial {best.number})" in legend and "hsm, mean response" in legend
    assert len(legend) == len(set(legend))  # one entry per estimator, not one per panel
    assert "m (dimensionless)" in _texts(bias, "ytitle")
    assert "c (shear units)" in _texts(bias, "y2title")
    intermediate = figures["intermediate-values-0"]
    assert _texts(intermediate, "ytitle") == ["validation RMSE of g"]
    assert _texts(intermediate, "xtitle") == ["epoch"]
    entries = _texts(intermediate, "legendtext")
    assert len(entries) == len(shear.study.trials) and any("(shearnet_cnn)" in e for e in entries)
    noise = figures["noise-levels-0"]
    assert "RMSE of g per galaxy" in _texts(noise, "ytitle")
    assert set(_texts(noise, "legendtext")) == {
        f"network (trial {best.number})", "reference (mean response)", "Cramér-Rao bound"}


def test_bias_figure_draws_each_estimator_in_one_colour():
    from lensnas.objectives.shear.report import bias_figure

    rows = {"network": {"m1": 0.01, "m1_err": 0.002, "m2": 0.0, "c1": 1e-4, "c2": 0.0},
            "metacal": {"m1": 0.0, "m2": 0.0, "c1": 0.0, "c2": 0.0}}
    figure = bias_figure(rows)
    colours = {}
    for trace in figure.data:
        colours.setdefault(trace.name, set()).add(trace.marker.color)
        assert trace.error_y.color == trace.marker.color
    assert all(len(c) == 1 for c in colours.values()) and len(colours) == 2
    assert colours["network"] != colours["metacal"]
    assert sum(trace.showlegend for trace in figure.data) == 2  # one legend entry each


def test_importances_of_a_maximised_metric_follow_its_best_trials(tmp_path, report):
    """PED-ANOVA ranks a given target lower-is-better; for a maximised metric of a
    multi-objective study the report negates it, so the importances are those of its best
    trials (driven by x here) and not of its worst (driven by y)."""
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    from lensnas.search.results.report import lower_is_better

    storage = f"sqlite:///{tmp_path / 'max.db'}"
    study = optuna.create_study(
        study_name="max", storage=storage, directions=["maximize", "minimize"],
        sampler=optuna.samplers.RandomSampler(seed=0),
    )

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
        return (x if y >= 0.2 else -10.0), y

    study.optimize(objective, n_trials=150)
    target = lower_is_better(study, 0, lambda t: t.values[0])
    importances = get_param_importances(
        study, evaluator=PedAnovaImportanceEvaluator(), target=target, normalize=False
    )
    assert importances["x"] > 5 * importances["y"]
    assert lower_is_better(study, 1, target) is target  # a minimised metric is left as it is
    assert "PedAnovaImportanceEvaluator" in report  # the report says which evaluator
