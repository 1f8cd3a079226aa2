"""The layer-by-layer inspector (issue 14, part 4): receptive fields against hand calculations,
the linear probe, `lensnas inspect` and the report's probe figure."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch

from lensnas.search.cli import main
from lensnas.search.results.export import study_objective
from lensnas.search.results.inspector import PROBE_RIDGE, block_features, layer_table, linear_probe
from lensnas.search.results.report import build_report
from lensnas.search.summary import best_trials
from lensnas.spaces.shear.cnn import SHEAR_CNN, build_shear_cnn
from lensnas.spaces.sr.net import SR_NET, build_sr_net
from tests.test_uncertainty import copied_tiny_shear_study, trial_network


def rows(model, x) -> list[tuple[str, str, str, str, int]]:
    return [(r.name, r.output, r.stride, r.receptive_field, r.parameters)
            for r in layer_table(model, x)]


def test_shearnet_preset_receptive_fields_match_the_hand_calculation():
    model = build_shear_cnn(SHEAR_CNN.config(SHEAR_CNN.presets["shearnet_cnn"]), image_size=53)
    # 3x3 conv: field 3; 2x2 pool: + (2 - 1) * 1 = 4, stride 2; 3x3 conv at stride 2: + 2 * 2 =
    # 8; pool: + 1 * 2 = 10, stride 4. Sizes 53 -> 26 -> 13; the dense head sees everything.
    assert rows(model, torch.zeros(1, 1, 53, 53)) == [
        ("features.0.conv", "16 x 53 x 53", "1", "3", 16 * 9 + 16),
        ("features.0.act", "16 x 53 x 53", "1", "3", 0),
        ("features.0.pool", "16 x 26 x 26", "2", "4", 0),
        ("features.1.conv", "32 x 26 x 26", "2", "8", 32 * 16 * 9 + 32),
        ("features.1.act", "32 x 26 x 26", "2", "8", 0),
        ("features.1.pool", "32 x 13 x 13", "4", "10", 0),
        ("head.0", "5408", "-", "whole input", 0),
        ("head.1", "128", "-", "whole input", 32 * 13 * 13 * 128 + 128),
        ("head.2", "128", "-", "whole input", 0),
        ("head.3", "2", "-", "whole input", 128 * 2 + 2),
    ]


def test_sr_preset_receptive_fields_match_the_hand_calculation():
    x = torch.zeros(1, 1, 16, 16)
    # SRCNN 9-1-5 on the x2 bicubic upsampling: bicubic takes 4 LR pixels at output stride 1/2;
    # the 9x9 conv adds 8 * 1/2, the 1x1 nothing, the 5x5 adds 4 * 1/2: 4, 8, 8, 10 LR pixels.
    srcnn = build_sr_net(SR_NET.config(SR_NET.presets["srcnn"]), scale=2)
    assert [(s, f) for _, _, s, f, _ in rows(srcnn, x)] == [("0.5", "8")] * 4 + [("0.5", "10")]
    # FSRCNN(56, 12, 4): 5x5 -> 5; 1x1; four 3x3 -> 7, 9, 11, 13; 1x1; a 9x9 deconvolution of
    # stride 2 takes at most ceil(9 / 2) = 5 LR pixels: + 4 -> 17, output stride 1/2.
    fsrcnn = rows(build_sr_net(SR_NET.config(SR_NET.presets["fsrcnn"]), scale=2), x)
    assert [f for _, _, _, f, _ in fsrcnn] == ["5"] * 4 + ["7", "7", "9", "9", "11", "11", "13",
                                                         "13", "13", "13", "17"]
    assert fsrcnn[-1][1:3] == ("1 x 32 x 32", "0.5")


def test_branches_and_attention_are_followed():
    config = SHEAR_CNN.config({**SHEAR_CNN.presets["research_backed"], "attention": "none"})
    table = {name: (stride, field) for name, _, stride, field, _ in
             rows(build_shear_cnn(config, image_size=25), torch.zeros(1, 1, 25, 25))}
    # stem 3x3: 3; parallel 3x3 at dilations 1, 3, 7: 3 + 2, 3 + 6, 3 + 14; the residual 1x1
    # keeps 3; their sum has the widest field, 17; the strided 3x3 conv: + 2 -> 19, stride 2.
    assert [table[f"features.0.branches.{i}.0"][1] for i in range(3)] == ["5", "9", "17"]
    assert table["features.0.skip.0"][1] == "3" and table["features.0.act"][1] == "17"
    assert table["features.0.pool.0"] == ("2", "19")
    assert [table[f"features.1.branches.{i}.0"][1] for i in range(3)] == ["23", "31", "47"]
    # channel attention (CBAM) gates every channel by a global pooling: the whole input
    cbam = build_shear_cnn(SHEAR_CNN.config(SHEAR_CNN.presets["research_backed"]), image_size=25)
    fields = {name: field for name, _, _, field, _ in rows(cbam, torch.zeros(1, 1, 25, 25))}
    assert fields["features.0.branches.2.0"] == "17" and fields["features.0.act"] == "whole input"


def test_parameter_counts_add_up_for_every_preset():
    for name, preset in SHEAR_CNN.presets.items():
        channels = 2 if preset["psf_branch"] else 1
        model = build_shear_cnn(SHEAR_CNN.config(preset), in_channels=channels, image_size=25)
        table = layer_table(model, torch.zeros(1, channels, 25, 25))
        assert sum(r.parameters for r in table) == sum(p.numel() for p in model.parameters()), name
        assert "?" not in {r.receptive_field for r in table}, name


def test_linear_probe_reads_a_linear_target_and_not_noise():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 30))
    weights = rng.normal(size=(30, 2))
    targets = features @ weights + 0.01 * rng.normal(size=(400, 2))
    assert linear_probe(features[:300], targets[:300], features[300:], targets[300:]) < 0.03
    noise = rng.normal(size=(400, 2))
    assert linear_probe(features[:300], noise[:300], features[300:], noise[300:]) > 0.9
    # more features than examples: solved in its dual form, the same fit as the primal one
    wide, target = rng.normal(size=(60, 200)), rng.normal(size=(60, 2))
    x = (wide[:40] - wide[:40].mean(0)) / wide[:40].std(0)
    primal = np.linalg.solve(x.T @ x + PROBE_RIDGE * 40 * np.eye(200), x.T @ (target[:40] - target[:40].mean(0)))
    predicted = (wide[40:] - wide[:40].mean(0)) / wide[:40].std(0) @ primal + target[:40].mean(0)
    assert linear_probe(wide[:40], target[:40], wide[40:], target[40:]) == pytest.approx(
        np.sqrt(np.mean((predicted - target[40:]) ** 2)), rel=1e-6)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return copied_tiny_shear_study(tmp_path_factory, "inspector")


def test_inspect_stores_the_probe_and_the_report_draws_it(study, tmp_path, capsys):
    trial = next(t for t in best_trials(study.study, 3) if "preset" not in t.user_attrs)
    page = tmp_path / "inspect.html"
    assert main(["inspect", "tiny5", "--storage", study.url, "--trial", str(trial.number),
                 "-o", str(page), "--cache-dir", str(study.cache_dir)]) == 0
    assert f"trial {trial.number}: " in capsys.readouterr().out
    text = page.read_text()
    assert 'id="layer-table"' in text and 'id="feature-maps"' in text
    assert 'id="probe-figure"' in text

    stored = optuna.load_study(study_name="tiny5", storage=study.url).user_attrs["inspector"]
    preset = next(t for t in study.study.trials if t.user_attrs.get("preset") == "shearnet_cnn")
    assert set(stored) == {str(trial.number), str(preset.number)}
    assert stored[str(preset.number)]["probe"]["blocks"] == ["block 1", "block 2", "dense hidden"]
    # block 1's probe, recomputed: its features pooled to 4x4, fitted on validation galaxies
    objective = study_objective(study.study, study.cache_dir)
    network = trial_network(study, trial, tmp_path / "trial")
    (val_x, val_y), (test_x, test_y) = objective.examples("validation"), objective.examples("test")
    train, test = block_features(network, val_x)["block 1"], block_features(network, test_x)["block 1"]
    probe = stored[str(trial.number)]["probe"]
    assert probe["rmse"][0] == pytest.approx(linear_probe(train, val_y, test, test_y))
    assert train.shape[1] == network.features[0].out_channels * 16
    assert probe["no_information_rmse"] == pytest.approx(
        np.sqrt(np.mean((test_y - val_y.mean(axis=0)) ** 2)))
    assert stored[str(trial.number)]["layers"][0]["receptive_field"] == str(
        trial.params.get("kernel_size", 3))

    report = build_report(optuna.load_study(study_name="tiny5", storage=study.url), study.url)
    section = report.split('<section id="inspector">', 1)[1].split("</section>", 1)[0]
    assert 'id="probe-figure"' in section and f"trial {preset.number} (preset shearnet_cnn)" in section
