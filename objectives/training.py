"""The training loop shared by every objective: seeded, prunable, NaN-aware."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from lensnas.objectives.base import TrainingResult, TrialContext, TrialFailed, TrialPruned

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


def _batches(n: int, batch_size: int, order: np.ndarray | None = None):
    order = np.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        yield np.sort(order[start : start + batch_size])


def _tensor(array: np.ndarray, index: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array[index], dtype=np.float32)).to(device)


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
    *,
    loss_fn: nn.Module,
    validation_score: Callable[[nn.Module], float],
    maximize: bool,
    score_label: str,
    learning_rate: float,
    batch_size: int,
    epochs: int,
    weight_decay: float,
    ctx: TrialContext,
) -> TrainingResult:
    """Train with AdamW; after each epoch report ``validation_score(model)`` (the objective's
    score in the units of its metrics, whatever the loss) and keep the best epoch's weights.

    Raises TrialPruned when the context says so and TrialFailed on a non-finite loss or score.
    """
    generator = seed_everything(ctx.seed)
    device = ctx.device
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    train_x, train_y = train
    sign = -1.0 if maximize else 1.0
    best_score, best_state, history = math.nan, None, []
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
        model.eval()
        with torch.no_grad():
            score = float(validation_score(model))
        if not math.isfinite(score):
            raise TrialFailed(f"non-finite {score_label} ({score}) at epoch {epoch}")
        history.append(score)
        ctx.report(epoch, score)
        ctx.log(f"epoch {epoch}/{epochs} {score_label} {score:.4g}")
        if best_state is None or sign * score < sign * best_score:
            best_score = score
            best_state = copy.deepcopy(model.state_dict())
        if ctx.should_prune():
            raise TrialPruned(f"pruned at epoch {epoch} ({score_label} {score:.4g})")
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainingResult(model, best_score, len(history), time.perf_counter() - started, history)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
