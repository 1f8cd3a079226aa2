"""benchmarks/sr_model1_table: on a tiny Model-1 study, the noise ceiling is the noiseless HR image
replayed from the study's seed (its targets match the cache), and the table shows the best trial
beside bilinear, the ceiling and the published numbers."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.sr_model1_table import main, noiseless_test_hr
from lensnas.objectives.sr.metrics import psnr_per_image
from lensnas.search import launch
from lensnas.search.spec import load_spec

STUDY = """
[study]
name = "model1-tiny"
objective = "sr"
metrics = ["psnr_gain"]
sampler = "random"
pruner = "none"
n_trials = 1
seed = 5

[objective]
n_train = 8
n_validation = 4
n_test = 40  # two simulation batches: the replay crosses a batch boundary

[training]
epochs = 1
batch_size = 4

[space]
backbone = "srcnn"
width = 8
depth = 1
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model1")
    path = folder / "model1.toml"
    path.write_text(STUDY)
    url = f"sqlite:///{folder / 'lensnas.db'}"
    launch(path, url, quiet=True, cache_dir=folder / "cache")
    return path, url, folder / "cache"


def test_the_ceiling_is_the_noiseless_hr_in_the_targets_units(finished):
    path, _, cache = finished
    objective = load_spec(path).make_objective(cache, progress=False)
    objective.prepare()
    clean = noiseless_test_hr(objective)
    assert clean.shape == objective.data["test_hr"].shape
    ceiling = float(np.mean(psnr_per_image(objective.data["test_hr"], np.clip(clean, 0, 1))))
    assert 29.5 < ceiling < 32.5  # 31.0 dB on 200 pairs (docs/super-resolution.md)
    objective.data["test_hr"] = objective.data["test_hr"][::-1].copy()  # not this study's targets
    with pytest.raises(RuntimeError, match="replayed test targets differ"):
        noiseless_test_hr(objective)


def test_the_table_shows_the_best_trial_beside_bilinear_and_the_published(finished, capsys):
    path, url, cache = finished
    main([str(path), "--storage", url, "--cache-dir", str(cache)])
    out = capsys.readouterr().out
    for row in ("published RCAN", "bilinear", "noiseless HR", "trial 0 (srcnn)"):
        assert row in out, out
    ceiling_row = next(line for line in out.splitlines() if "noiseless HR" in line)
    assert "100%" in ceiling_row
