"""benchmarks.search_efficiency: the printed comparison has its shape (not its numbers).

A micro run of the real command (one seed, 3 trials per study, the --quick objective): real
lensnas studies in SQLite, the local executor for one trial at a time, a local Ray for the
studies with 4 trials in flight.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9][0-9.e+-]*"
SPREAD = rf"{NUMBER} \[{NUMBER}-{NUMBER}\]"  # median [min-max]
LABELS = ("grid", "random", "tpe", "gp", "tpe, 4 in flight", "gp, 4 in flight")


def _row(text: str, label: str) -> list[str]:
    """The cells of the markdown table row that starts with ``label`` (the first such row)."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in:\n{text}")


def test_micro_run_prints_every_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.search_efficiency", "--quick", "--seeds", "1",
         "--trials", "3", "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    for label in LABELS:  # one line per study as it ends
        assert re.search(rf"^  {re.escape(label)}, seed 1: 3 trials in \d+ s, best {NUMBER}$",
                         out, re.MULTILINE), label

    best_table, reach_part = out.split("trials needed to reach the grid's final best")
    assert "N=1" in best_table and "N=3" in best_table
    for label in LABELS:
        cells = _row(best_table, label)
        assert len(cells) == 3 and all(re.fullmatch(SPREAD, c) for c in cells), cells
        values = [float(c.split()[0]) for c in cells]
        assert values == sorted(values, reverse=True)  # the best so far never gets worse

    reach_table, ranking_part = reach_part.split("grid: the trial ShearNet's ranking picks")
    for label in LABELS[1:]:
        per_seed, within, ratio = _row(reach_table, label)
        assert re.fullmatch(r">3|[123]", per_seed) and re.fullmatch(r"[01]/1", within)
        if per_seed == ">3":
            assert ratio == ">1 (not reached)"
        else:
            assert abs(float(ratio) - int(per_seed) / 3) < 0.01
    assert re.search(r"TPE \(one trial at a time\) reached the grid's final best within a third "
                     r"of the grid's trials \(1\) in [01] of 1 seeds, within all 3 in [01] of 1\.",
                     reach_part)

    cells = _row(ranking_part, "1")  # seed 1: picked, its value, best (trial), |m|, smallest |m|
    picked, value, best, abs_m, flattest = cells[:5]
    grid_best = float(_row(best_table, "grid")[-1].split()[0])
    assert float(best.split()[0]) == grid_best  # both read the grid's best trial
    assert float(value) >= grid_best and re.fullmatch(r"[012]", picked)
    assert float(flattest.split()[0]) <= float(abs_m)
    assert re.search(r"ShearNet's ranking \(validation loss\) picked a trial that is not the best "
                     r"by test rmse_over_crb in [01] of 1 seeds, and not the one with the smallest "
                     rf"\|m\| in [01] of 1; the picked trial's rmse_over_crb over the grid's best: "
                     rf"{SPREAD}\.", ranking_part)
    assert re.search(r"^18 trials \(0 failed\) in [0-9.]+ min", out, re.MULTILINE)
