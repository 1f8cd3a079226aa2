"""The array cache: keyed by configuration, checksummed, built once under concurrency."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np

from lensnas.objectives.cache import cached_arrays, config_hash, entry_path, load_entry


def _build_slowly(marker_dir: str):
    def build():
        (multiprocessing.current_process().name, time.sleep(0.5))
        with open(f"{marker_dir}/built-{multiprocessing.current_process().pid}", "w"):
            pass
        return {"x": np.arange(1000.0)}, {"note": "built"}
    return build


def _worker(root: str, marker_dir: str, queue) -> None:
    arrays, _, hit = cached_arrays(root, "demo", {"a": 1}, _build_slowly(marker_dir))
    queue.put((float(arrays["x"].sum()), hit))


def test_hash_depends_on_configuration_only():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_tampered_entry_is_detected_and_rebuilt(tmp_path):
    build = lambda: ({"x": np.arange(10.0)}, {})
    _, _, hit = cached_arrays(tmp_path, "demo", {"a": 1}, build)
    assert hit is False
    arrays, _, hit = cached_arrays(tmp_path, "demo", {"a": 1}, build)
    assert hit is True and arrays["x"].flags.writeable is False  # memory-mapped, read-only
    file = entry_path(tmp_path, "demo", {"a": 1}) / "x.npy"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    arrays, _, hit = cached_arrays(tmp_path, "demo", {"a": 1}, build)
    assert hit is False
    np.testing.assert_array_equal(arrays["x"], np.arange(10.0))
    load_entry(entry_path(tmp_path, "demo", {"a": 1}))  # valid again


def test_two_processes_building_the_same_entry_build_it_once(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_worker, args=(str(tmp_path / "c"), str(markers), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    results = sorted(queue.get(timeout=5) for _ in workers)
    assert [r[0] for r in results] == [float(np.arange(1000.0).sum())] * 2
    assert sorted(r[1] for r in results) == [False, True]
    assert len(list(markers.iterdir())) == 1
