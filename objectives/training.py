"""The training loop shared by every objective: seeded, prunable, NaN-aware."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lensnas.objectives.trial import TrainingResult, TrialContext, TrialFailed, TrialPruned

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


# Training recipe options every family accepts (``[training]`` or ``[space]``), with defaults
# that reproduce the plain loop: AdamW at a constant learning rate.
RECIPE_DEFAULTS: dict[str, Any] = {
    "lr_schedule": "constant",  # constant | cosine (with warmup_fraction) | onecycle | plateau
    "warmup_fraction": 0.0,  # cosine: fraction of the steps with a linear warm-up
    "optimizer": "adamw",  # adamw | sgd (with momentum)
    "momentum": 0.9,
    "grad_clip": 0.0,  # global gradient norm; 0 = off
    "ema_decay": 0.0,  # exponential moving average of the weights, evaluated and exported; 0 = off
    "precision": "fp32",  # fp32 | bf16 (autocast on CUDA)
    "channels_last": False,  # CUDA memory format
    "compile": False,  # torch.compile the model
}
SCHEDULES = ("constant", "cosine", "onecycle", "plateau")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
DEVICE_FRACTION = 0.5  # a training set larger than this share of free GPU memory stays on the host

BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class TrainingStep:
    """What the shared loop does with each training batch, for objectives that need more than
    a loss (as Ray Tune's Trainable: the loop owns the epochs, batches, the model's optimizer,
    schedule, weight averaging, validation, best-epoch selection and pruning; a step owns the
    loss and any work of its own, such as an adversary's update).

    The base is the plain supervised step, ``loss_fn(model(x), y)``. An objective's ``loss``
    hook returns a subclass (instead of a loss module) to change it.
    """

    def __init__(self, loss_fn: nn.Module):
        self.loss_fn = loss_fn

    def setup(self, model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, device: str,
              seed: int) -> None:
        """Once, before the model's optimizer is made: train or load auxiliary networks,
        freeze parts of the model. ``train_x``, ``train_y``: the training split (on
        ``device`` when it fits); ``seed``: the trial's."""

    def loss(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             y: torch.Tensor, epoch: int) -> torch.Tensor:
        """The loss of one batch, minimised by the model's optimizer (``forward``: the model,
        compiled when asked; ``epoch`` counts from 1)."""
        return self.loss_fn(forward(x).float(), y)

    def after_step(self, epoch: int) -> None:
        """After the model's optimizer step on a batch (an adversary's own step)."""

    def selectable(self, epoch: int) -> bool:
        """Whether the weights after ``epoch`` may be kept as the trial's best."""
        return True


def recipe(config: dict[str, Any]) -> dict[str, Any]:
    """The trial's recipe options: :data:`RECIPE_DEFAULTS` overlaid with ``config``."""
    return {key: config.get(key, default) for key, default in RECIPE_DEFAULTS.items()}


def as_device_tensor(array: Any, device: str) -> torch.Tensor:
    """One float32 copy of an array-like training split on ``device`` when it fits (batches are
    then indexed there); otherwise in pinned host memory, copied batch by batch."""
    host = torch.from_numpy(np.ascontiguousarray(np.asarray(array[np.arange(len(array))], dtype=np.float32)))
    if not device.startswith("cuda"):
        return host
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if host.numel() * 4 < DEVICE_FRACTION * free:
        return host.to(device)
    return host.pin_memory()


def _optimizer(model: nn.Module, options: dict[str, Any], learning_rate: float, weight_decay: float):
    if options["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=options["momentum"],
                               weight_decay=weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)


def _scheduler(optimizer: torch.optim.Optimizer, options: dict[str, Any], learning_rate: float,
               total_steps: int, maximize: bool):
    """The learning-rate schedule; stepped per batch except "plateau" (per epoch)."""
    name = options["lr_schedule"]
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=total_steps)
    if name == "cosine":
        warmup = int(options["warmup_fraction"] * total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max" if maximize else "min", factor=0.5, patience=2
        )
    return None


def train_model(
    model: nn.Module,
    train: tuple[Any, Any],
    *,
    loss_fn: nn.Module | TrainingStep,
    validation_score: Callable[[nn.Module], float],
    maximize: bool,
    score_label: str,
    learning_rate: float,
    batch_size: int,
    epochs: int,
    weight_decay: float,
    ctx: TrialContext,
    options: dict[str, Any] | None = None,
    batch_transform: BatchTransform | None = None,
) -> TrainingResult:
    """Train ``model``; after each epoch report ``validation_score(model)`` (the objective's
    score in the units of its metrics, whatever the loss) and keep the best epoch's weights.

    ``options`` are the recipe (:data:`RECIPE_DEFAULTS`: schedule, optimizer, gradient
    clipping, weight averaging, precision); ``batch_transform(x, y, generator)`` changes each
    training batch (augmentation, fresh noise) with the trial's seeded generator. The training
    set is copied once to the device when it fits. ``loss_fn`` is a loss module or a
    :class:`TrainingStep` (a loss with steps of its own: multi-level supervision, an
    adversary); the best epoch is chosen among those the step calls selectable. Raises
    TrialPruned when the context says so and TrialFailed on a non-finite loss or score.
    """
    options = recipe(options or {})
    step = loss_fn if isinstance(loss_fn, TrainingStep) else TrainingStep(loss_fn)
    generator = seed_everything(ctx.seed)
    device = ctx.device
    batch_generator = torch.Generator(device=device).manual_seed(ctx.seed)
    model.to(device)
    if options["channels_last"] and device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    train_x, train_y = (as_device_tensor(a, device) for a in train)
    step.setup(model, train_x, train_y, device, ctx.seed)
    optimizer = _optimizer(model, options, learning_rate, weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    scheduler = _scheduler(optimizer, options, learning_rate, epochs * steps_per_epoch, maximize)
    per_batch = scheduler is not None and options["lr_schedule"] != "plateau"
    averaged = None
    if options["ema_decay"] > 0:
        averaged = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(options["ema_decay"]),
            use_buffers=True,
        )
    forward = torch.compile(model) if options["compile"] else model
    autocast = options["precision"] == "bf16" and device.startswith("cuda")
    sign = -1.0 if maximize else 1.0
    best_score, best_state, history = math.nan, None, []
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            x = train_x[index].to(device, non_blocking=True)
            y = train_y[index].to(device, non_blocking=True)
            if batch_transform is not None:
                x, y = batch_transform(x, y, batch_generator)
            if options["channels_last"] and device.startswith("cuda"):
                x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = step.loss(forward, x, y, epoch)
            if not torch.isfinite(loss):
                raise TrialFailed(f"non-finite training loss ({float(loss.detach())}) at epoch {epoch}")
            loss.backward()
            if options["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), options["grad_clip"])
            optimizer.step()
            step.after_step(epoch)
            if per_batch:
                scheduler.step()
            if averaged is not None:
                averaged.update_parameters(model)
        evaluated = model if averaged is None else averaged.module
        evaluated.eval()
        with torch.no_grad():
            score = float(validation_score(evaluated))
        if not math.isfinite(score):
            raise TrialFailed(f"non-finite {score_label} ({score}) at epoch {epoch}")
        if scheduler is not None and not per_batch:
            scheduler.step(score)
        history.append(score)
        ctx.report(epoch, score)
        ctx.log(f"epoch {epoch}/{epochs} {score_label} {score:.4g}")
        if step.selectable(epoch) and (best_state is None or sign * score < sign * best_score):
            best_score = score
            best_state = copy.deepcopy(evaluated.state_dict())
        if ctx.should_prune():
            raise TrialPruned(f"pruned at epoch {epoch} ({score_label} {score:.4g})")
    result = model if averaged is None else averaged.module
    if best_state is not None:
        result.load_state_dict(best_state)
    return TrainingResult(result, best_score, len(history), time.perf_counter() - started, history)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
