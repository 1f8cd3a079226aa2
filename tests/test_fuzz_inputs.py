"""Fuzzed user inputs beyond study files: corrupted SR folders, unreachable storages, failing trials."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import optuna
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lensnas.objectives.sr.data import folder_dataset
from lensnas.search.cli import main
from lensnas.spaces.errors import DataError
from tests.conftest import write_tiny_shear_study


def _good_folder(folder: Path, count: int = 4) -> None:
    rng = np.random.default_rng(0)
    for side, shape in (("LR", (12, 12)), ("HR", (24, 24))):
        (folder / side).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            np.save(folder / side / f"img{i}.npy", rng.random(shape))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


corruptions = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 1300)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 1300), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("junk"), st.binary(max_size=300)),
    st.tuples(st.just("array"), st.sampled_from(["nan", "inf", "object", "complex", "int", "3d", "empty", "string", "scalar"])),
)
ARRAYS = {
    "nan": np.full((12, 12), np.nan), "inf": np.full((24, 24), -np.inf),
    "object": np.array([{"a": 1}] * 4, dtype=object), "complex": np.ones((12, 12), complex),
    "int": np.ones((12, 12), np.int64), "3d": np.ones((2, 3, 12, 12)), "empty": np.ones((0, 12)),
    "string": np.array(["lens"] * 3), "scalar": np.array(3.0),
}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(side=st.sampled_from(["LR", "HR"]), index=st.integers(0, 3), corruption=corruptions)
def test_corrupted_sr_folder_gives_one_line_naming_the_file(tmp_path, side, index, corruption):
    folder = tmp_path / "pairs"
    shutil.rmtree(folder, ignore_errors=True)
    _good_folder(folder)
    victim = folder / side / f"img{index}.npy"
    data = victim.read_bytes()
    kind, detail = corruption
    if kind == "truncate":
        data = data[:detail]
    elif kind == "flip":
        data = bytearray(data)
        for position, mask in detail:
            data[position % len(data)] ^= mask
        data = bytes(data)
    elif kind == "junk":
        data = detail
    else:
        data = _npy_bytes(ARRAYS[detail])
    victim.write_bytes(data)
    try:
        dataset = folder_dataset(folder, 2, validation_fraction=0.25, test_fraction=0.25, seed=0, normalize=True)
    except DataError as error:
        message = str(error)
        assert message.startswith(str(folder)) and "\n" not in message
        return
    for key, array in dataset.items():  # a harmless corruption (a flipped mantissa bit) still loads
        assert np.all(np.isfinite(array)), key


@settings(max_examples=60, deadline=None)
@given(url=st.one_of(
    st.text(max_size=40),
    st.sampled_from([
        "postgresql://u:topsecret@127.0.0.1:9/db", "mysql://u:topsecret@127.0.0.1:9/db",
        "sqlite:////nonexistent/dir/x.db", "sqlite://", "http://example.org", "://", "postgresql://",
        "oracle+nodriver://u:topsecret@h/db", "sqlite:///" + "x" * 300 + "/y.db",
    ]),
))
def test_bad_storage_urls_give_one_line_without_the_password(url):
    import contextlib
    import io as _io

    err = _io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["status", "some-study", f"--storage={url}"])
    text = err.getvalue()
    assert code == 2, (url, text)
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text
    assert "topsecret" not in text


def test_failing_trials_are_recorded_and_stop_the_launch(tmp_path, capsys):
    study_file = write_tiny_shear_study(tmp_path, n_trials=6, objective_extra='reference = "none"')
    text = study_file.read_text()
    # a dense head on 512 unpooled channels is refused when the network is built
    text = text.replace('width = { type = "categorical", choices = [4, 8, 16] }', "width = 512")
    text = text.replace('pooling = { type = "categorical", choices = ["avg", "max", "conv", "none"] }', 'pooling = "none"')
    text = text.replace('head = { type = "categorical", choices = ["dense", "gap"] }', 'head = "dense"')
    text = text.replace("choices = [16, 128]", "choices = [1024]").replace('presets = ["shearnet_cnn"]', "")
    study_file.write_text(text)
    storage = f"sqlite:///{tmp_path}/s.db"
    assert main(["launch", str(study_file), "--storage", storage, "--max-failures", "2"]) == 1
    err = capsys.readouterr().err
    assert "stopped after 2 consecutive failed trials" in err
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert len(trials) == 2
    for trial in trials:
        assert trial.state == optuna.trial.TrialState.FAIL
        assert "dense head" in trial.user_attrs["fail_reason"]
