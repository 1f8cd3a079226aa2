"""The training loop shared by every objective: seeded, prunable, NaN-aware."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from lensnas.objectives.base import TrialContext, TrialFailed, TrialPruned
from torch import nn

REGRESSION_LOSSES: dict[str, Callable[[], nn.Module]] = {
    "mse": nn.MSELoss,
    "l1": nn.L1Loss,
    "huber": lambda: nn.HuberLoss(delta=1.0),
}


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy for one trial; returns a generator for batch shuffling."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@dataclass
class TrainingResult:
    model: nn.Module
    best_val_loss: float
    epochs_run: int
    train_seconds: float
    val_history: list[float] = field(default_factory=list)


def _batches(n: int, batch_size: int, order: np.ndarray | None = None):
    order = np.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        yield np.sort(order[start : start + batch_size])


def _tensor(array: np.ndarray, index: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array[index], dtype=np.float32)).to(device)


def evaluate_loss(
    model: nn.Module, loss_fn: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int, device: str
) -> float:
    """Mean loss of ``model`` over ``(x, y)``, weighted by batch size."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for index in _batches(len(x), batch_size):
            prediction = model(_tensor(x, index, device))
            total += float(loss_fn(prediction, _tensor(y, index, device))) * len(index)
            count += len(index)
    return total / max(count, 1)


def predict(model: nn.Module, x: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    """Run ``model`` over ``x`` in batches and return a float64 numpy array."""
    model.eval()
    outputs = []
    with torch.no_grad():
        for index in _batches(len(x), batch_size):
            outputs.append(model(_tensor(x, index, device)).double().cpu().numpy())
    return np.concatenate(outputs)


def train_model(
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    *,
    loss_fn: nn.Module,
    learning_rate: float,
    batch_size: int,
    epochs: int,
    weight_decay: float,
    ctx: TrialContext,
) -> TrainingResult:
    """Train with Adam, report validation loss each epoch, keep the best-validation weights.

    Raises TrialPruned when the context says so and TrialFailed on a non-finite loss.
    """
    generator = seed_everything(ctx.seed)
    device = ctx.device
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    train_x, train_y = train
    val_x, val_y = validation
    best_loss, best_state, history = math.inf, None, []
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=generator).numpy()
        for start in range(0, len(order), batch_size):
            index = np.sort(order[start : start + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(_tensor(train_x, index, device)), _tensor(train_y, index, device))
            if not torch.isfinite(loss):
                raise TrialFailed(f"non-finite training loss ({float(loss.detach())}) at epoch {epoch}")
            loss.backward()
            optimizer.step()
        val_loss = evaluate_loss(model, loss_fn, val_x, val_y, batch_size, device)
        if not math.isfinite(val_loss):
            raise TrialFailed(f"non-finite validation loss ({val_loss}) at epoch {epoch}")
        history.append(val_loss)
        ctx.report(epoch, val_loss)
        ctx.log(f"epoch {epoch}/{epochs} val_loss {val_loss:.3e}")
        if val_loss < best_loss:
            best_loss = val_loss
            best_state = copy.deepcopy(model.state_dict())
        if ctx.should_prune():
            raise TrialPruned(f"pruned at epoch {epoch} (val_loss {val_loss:.3e})")
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainingResult(model, best_loss, len(history), time.perf_counter() - started, history)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
