"""Training throughput of a shear trial's loop against a bare PyTorch loop, side by side.

    python -m benchmarks.training_throughput [--train 4096] [--epochs 3] [--repeats 3]
                                             [--device auto] [--batch-size 128]

Both loops train the same network (ShearNet's CNN preset) on the same simulated stamps with
the same batch size and AdamW. The trial's loop is ``ShearObjective.train`` as a study runs
it (seeded shuffling, the device-resident training set, the per-epoch validation score on
a small validation split, best-epoch bookkeeping); the bare loop is the few lines of PyTorch
a hand-written script would use, on tensors already on the device. Each is timed
``--repeats`` times, alternating; the table shows training samples per second (median, min,
max) and the ratio trial / bare of the medians. The design target: at least 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from lensnas.objectives import LocalContext
from lensnas.objectives.shear.objective import ShearObjective
from lensnas.search.study import resolve_device
from lensnas.spaces.shear.cnn import SHEARNET_CNN


def bare_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
              batch_size: int, learning_rate: float) -> None:
    """The plain PyTorch loop: shuffle, forward, MSE, backward, step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    loss_fn = torch.nn.MSELoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), device=x.device)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[index]), y[index]).backward()
            optimizer.step()


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(train: int, epochs: int, repeats: int, device: str, batch_size: int) -> dict[str, list[float]]:
    """Samples per second of each loop, ``repeats`` times each (alternating)."""
    options = {"n_train": train, "n_validation": 256, "n_test": 16, "reference": "none"}
    config = {**SHEARNET_CNN, "epochs": epochs, "batch_size": batch_size, "learning_rate": 1e-3}
    with tempfile.TemporaryDirectory() as cache:
        objective = ShearObjective(options, {}, seed=0, cache_dir=cache, progress=True)
        objective.prepare()
        full = objective.config(config)
        inputs, labels = objective.training_data(full)
        x = torch.from_numpy(np.asarray(inputs[np.arange(len(inputs))], dtype=np.float32)).to(device)
        y = torch.from_numpy(np.array(labels, dtype=np.float32)).to(device)
        rates: dict[str, list[float]] = {"trial loop": [], "bare PyTorch loop": []}
        for repeat in range(repeats):
            torch.manual_seed(repeat)
            model = objective.build_model(config).to(device)
            _synchronize(device)
            started = time.perf_counter()
            objective.train(model, full, LocalContext(device=device, seed=repeat,
                                                      artifact_dir=cache))
            _synchronize(device)
            rates["trial loop"].append(epochs * train / (time.perf_counter() - started))
            torch.manual_seed(repeat)
            model = objective.build_model(config).to(device)
            _synchronize(device)
            started = time.perf_counter()
            bare_loop(model, x, y, epochs, batch_size, 1e-3)
            _synchronize(device)
            rates["bare PyTorch loop"].append(epochs * train / (time.perf_counter() - started))
    return rates


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=4096, help="training stamps (53x53)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    device = resolve_device(args.device, "--device")
    rates = run(args.train, args.epochs, args.repeats, device, args.batch_size)
    table = Table(title=f"Training throughput, ShearNet CNN, {args.train} stamps 53x53, "
                        f"batch {args.batch_size}, {args.epochs} epochs, {device} "
                        f"({torch.get_num_threads()} threads)")
    for column in ("loop", "median samples/s", "min", "max"):
        table.add_column(column, justify="left" if column == "loop" else "right")
    for name, values in rates.items():
        table.add_row(name, f"{statistics.median(values):.0f}", f"{min(values):.0f}",
                      f"{max(values):.0f}")
    console = Console()
    console.print(table)
    ratio = statistics.median(rates["trial loop"]) / statistics.median(rates["bare PyTorch loop"])
    console.print(f"ratio trial / bare (medians): {ratio:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
