"""The layer-by-layer inspector: ``lensnas inspect STUDY --trial N``.

For one trial's network (from the artifact store):

- every layer's output size, stride and receptive field, and its parameter count
  (:func:`layer_table`). Strides and receptive fields are computed from the network itself:
  one forward pass under a :class:`torch.overrides.TorchFunctionMode` follows, for every
  tensor, where its pixels look in the input (per axis: the spacing of its pixels in input
  pixels, the width of their field, where the first one is centred), through every operation
  (convolutions, pooling, transposed convolutions, interpolation, pixel shuffle, padding;
  element-wise operations and concatenations take the union of their inputs' fields, so
  branches and skips are right). An output that depends on every input pixel (after a global
  pooling, a dense layer or channel attention) has the whole input as its field. Units: input
  pixels; an SR network's stride 0.5 means two output pixels per input pixel.
- the feature maps of one test example at every block (networks that name their blocks with
  a ``blocks()`` method), as a figure;
- where the information on the outputs is lost: a linear probe of the true outputs (the
  objective's labels) fitted by ridge least squares on each block's features average-pooled to
  a ``PROBE_GRID`` x ``PROBE_GRID`` grid, on the validation examples, and scored (RMSE) on the
  test examples; for the trial and for the study's preset trials (the known networks it
  started from). A network averaged over D4 is inspected as the network it averages.

The table and the probe are stored with the study (user attribute ``inspector``) for the report;
the feature maps go into the inspector's own HTML page.
"""

from __future__ import annotations

import html
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import plotly.graph_objects as go
import plotly.offline
import torch
import torch.nn.functional as F
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots
from torch import nn
from torch.overrides import TorchFunctionMode

from lensnas import spaces
from lensnas.objectives.report_html import STYLE, figure_html, format_value, html_table, note
from lensnas.search.artifacts import artifact_store, download_trial_artifacts
from lensnas.search.results.export import ExportError, example_input, study_objective
from lensnas.search.results.sections import (
    INSPECTOR_ATTR,
    LAYER_HEADER,
    LAYER_NOTE,
    PROBE_GRID,
    PROBE_NOTE,
    layer_rows,
    probe_figure,
)
from lensnas.spaces.d4 import D4Symmetrized
from lensnas.spaces.errors import OptionError
from lensnas.spaces.loading import ARCHITECTURE_FILE, WEIGHTS_FILE, read_architecture

PROBE_RIDGE = 1e-3  # ridge strength per example, on standardised features
MAP_CHANNELS = 6  # feature maps drawn per block: the channels that vary most
BATCH = 128



# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Axis:
    """Where a feature map's pixels look in the input along one axis, in input pixels."""

    jump: float  # spacing of neighbouring pixels (the stride)
    size: float  # width of each pixel's receptive field
    start: float  # centre of the first pixel's field

    def then(self, kernel: int, stride: float = 1, left_pad: float = 0, dilation: int = 1) -> Axis:
        """After a window of ``kernel`` taps (a convolution or a pooling)."""
        span = dilation * (kernel - 1)
        return Axis(self.jump * stride, self.size + span * self.jump,
                    self.start + (span / 2 - left_pad) * self.jump)


GLOBAL = "global"  # a tensor every input pixel can change
Field = tuple[Axis, Axis] | str | None  # per spatial axis (height, width); GLOBAL; None: unknown


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _pair(value: Any) -> tuple[Any, Any]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _union(fields: list[Field]) -> Field:
    """The field of an element-wise combination of tensors of the same size."""
    if any(f is None for f in fields):
        return None
    if GLOBAL in fields:
        return GLOBAL
    axes = []
    for parts in zip(*fields):
        if len({p.jump for p in parts}) > 1:
            return None
        low = min(p.start - (p.size - 1) / 2 for p in parts)
        high = max(p.start + (p.size - 1) / 2 for p in parts)
        axes.append(Axis(parts[0].jump, high - low + 1, (low + high) / 2))
    return tuple(axes)


def _window(field: tuple[Axis, Axis], kernel: Any, stride: Any, padding: Any,
            dilation: Any) -> Field:
    axes = []
    for axis, k, s, p, d in zip(field, _pair(kernel), _pair(stride), _pair(padding),
                                _pair(dilation)):
        if p == "same":
            p = d * (k - 1) // 2  # PyTorch pads the extra pixel of an even kernel on the right
        elif p == "valid":
            p = 0
        axes.append(axis.then(int(k), s, p, int(d)))
    return tuple(axes)


def propagate(name: str, args: tuple, kwargs: dict, fields: list[Field], source: torch.Tensor,
              out: torch.Tensor) -> Field:
    """The field of ``out``, the result of torch function ``name`` on ``args`` whose tracked
    tensors have ``fields`` (``source``: the first of them)."""
    if out.dim() < 3 or GLOBAL in fields:
        return GLOBAL
    if None in fields:
        return None
    field = fields[0]
    if name == "conv2d":
        kernel = tuple(args[1].shape[-2:])
        return _window(field, kernel, _arg(args, kwargs, 3, "stride", 1),
                       _arg(args, kwargs, 4, "padding", 0), _arg(args, kwargs, 5, "dilation", 1))
    if name in ("max_pool2d", "avg_pool2d"):
        kernel = _arg(args, kwargs, 1, "kernel_size", 1)
        stride = _arg(args, kwargs, 2, "stride", None) or kernel
        dilation = _arg(args, kwargs, 4, "dilation", 1) if name == "max_pool2d" else 1
        return _window(field, kernel, stride, _arg(args, kwargs, 3, "padding", 0), dilation)
    if name == "conv_transpose2d":
        stride, padding = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0)
        dilation = _arg(args, kwargs, 7, "dilation", 1)
        axes = []
        for axis, k, s, p, d in zip(field, args[1].shape[-2:], _pair(stride), _pair(padding),
                                    _pair(dilation)):
            span = d * (int(k) - 1)  # an output pixel takes at most span // s + 1 input pixels
            axes.append(Axis(axis.jump / s, axis.size + (span // s) * axis.jump,
                             axis.start + (p - span / 2) / s * axis.jump))
        return tuple(axes)
    in_size, out_size = tuple(source.shape[-2:]), tuple(out.shape[-2:])
    if name == "interpolate":
        mode = _arg(args, kwargs, 3, "mode", "nearest")
        # taps per axis of the interpolation kernel ("bi" names the 2-D version of each)
        taps = {"nearest": 1, "linear": 2, "cubic": 4}.get(mode.removeprefix("bi"))
        if taps is None:
            return None
        axes = []
        for axis, n_in, n_out in zip(field, in_size, out_size):
            ratio = n_in / n_out
            shift = 0.0 if mode == "nearest" else 0.5 * ratio - 0.5
            axes.append(Axis(axis.jump * ratio, axis.size + (taps - 1) * axis.jump,
                             axis.start + shift * axis.jump))
        return tuple(axes)
    if name == "pixel_shuffle":
        factor = int(_arg(args, kwargs, 1, "upscale_factor", 1))
        return tuple(Axis(a.jump / factor, a.size, a.start) for a in field)
    if name == "pad":
        left, _, top, _ = (list(_arg(args, kwargs, 1, "pad", ())) + [0] * 4)[:4]
        height, width = field  # the first output pixel is now `top` (`left`) pixels earlier
        return (Axis(height.jump, height.size, height.start - top * height.jump),
                Axis(width.jump, width.size, width.start - left * width.jump))
    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        return GLOBAL if out_size == (1, 1) else (field if out_size == in_size else None)
    if name in ("transpose", "swapaxes", "transpose_"):
        dims = {d % out.dim() for d in args[1:3]}
        if dims == {out.dim() - 2, out.dim() - 1}:
            return field[::-1]
    return _union(fields) if out_size == in_size else None


class FieldTracker(TorchFunctionMode):
    """Follows the receptive field of every tensor computed from a tracked input."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[int, tuple[torch.Tensor, Field]] = {}

    def track(self, tensor: torch.Tensor, field: Field) -> None:
        self.fields[id(tensor)] = (tensor, field)  # the tensor is kept: its id stays unique

    def field(self, tensor: Any) -> Field | bool:
        """The tracked field of ``tensor``; False when it is not tracked."""
        entry = self.fields.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else False

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        candidates = [*args, *kwargs.values()]
        candidates += [t for a in args if isinstance(a, (list, tuple)) for t in a]
        tracked = [(t, self.field(t)) for t in candidates if isinstance(t, torch.Tensor)]
        tracked = [(t, f) for t, f in tracked if f is not False]
        result = out[0] if isinstance(out, tuple) and out else out
        if tracked and isinstance(result, torch.Tensor):
            name = getattr(func, "__name__", "")
            size = tracked[0][0].shape[-2:]  # other sizes only broadcast a global tensor
            fields = [f if t.shape[-2:] == size or f == GLOBAL else None for t, f in tracked]
            self.track(result, propagate(name, args, kwargs, fields, tracked[0][0], result))
        return out


@dataclass(frozen=True)
class Layer:
    """One row of the layer table."""

    name: str  # qualified module name
    block: str  # the named block it belongs to ("" if none)
    kind: str  # module class
    output: str  # output shape without the batch axis, e.g. "16 x 53 x 53"
    stride: str  # input pixels between neighbouring output pixels (per axis when they differ)
    receptive_field: str  # input pixels, "whole input", or "?" where it could not be followed
    parameters: int


def _axes_text(field: Field, attribute: str) -> str:
    if field is None:
        return "?"
    if field == GLOBAL:
        return "whole input" if attribute == "size" else "-"
    values = [getattr(axis, attribute) for axis in field]
    texts = [f"{v:g}" for v in values]
    return texts[0] if texts[0] == texts[1] else " x ".join(texts)


def unwrap(model: nn.Module) -> nn.Module:
    """The network a D4-symmetrized model averages (inspected as itself)."""
    return model.network if isinstance(model, D4Symmetrized) else model


def named_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's named blocks (its ``blocks()``), or none."""
    blocks = getattr(unwrap(model), "blocks", None)
    return list(blocks()) if callable(blocks) else []


def layer_table(model: nn.Module, x: torch.Tensor) -> list[Layer]:
    """Each layer of ``model`` (leaf modules and modules with their own parameters, in the
    order they run on ``x``): output size, stride, receptive field and parameter count."""
    network = unwrap(model).eval()
    names = {module: name for name, module in network.named_modules()}
    block_of = {}
    for block_name, block in named_blocks(network):
        for module in block.modules():
            block_of.setdefault(module, block_name)
    rows: dict[nn.Module, Layer] = {}
    tracker = FieldTracker()

    def hook(module: nn.Module, _: Any, output: Any) -> None:
        if module in rows:
            return
        result = output[0] if isinstance(output, tuple) else output
        field = tracker.field(result) if isinstance(result, torch.Tensor) else None
        field = None if field is False else field
        shape = " x ".join(map(str, result.shape[1:])) if isinstance(result, torch.Tensor) else "?"
        rows[module] = Layer(
            names[module], block_of.get(module, ""), type(module).__name__, shape,
            _axes_text(field, "jump"), _axes_text(field, "size"),
            sum(p.numel() for p in module.parameters(recurse=False)),
        )

    chosen = [m for m in network.modules() if m is not network
              and (not list(m.children()) or list(m.parameters(recurse=False)))
              and not isinstance(m, nn.Identity)]
    handles = [module.register_forward_hook(hook) for module in chosen]
    x = x.detach().clone()
    try:
        with torch.no_grad(), tracker:
            tracker.track(x, (Axis(1.0, 1.0, 0.0), Axis(1.0, 1.0, 0.0)))
            network(x)
    finally:
        for handle in handles:
            handle.remove()
    return list(rows.values())


# ----------------------------------------------------------------------------- features


@contextmanager
def block_outputs(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """While open, the latest output of each named block of ``model``, by name."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        block.register_forward_hook(
            lambda _, __, output, name=name: outputs.__setitem__(name, output.detach()))
        for name, block in named_blocks(model)
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def pooled(features: torch.Tensor) -> np.ndarray:
    """A block's output as probe features: maps average-pooled to a PROBE_GRID grid, flat."""
    if features.dim() == 4:
        size = min(PROBE_GRID, *features.shape[-2:])
        features = F.adaptive_avg_pool2d(features, size)
    return features.flatten(1).double().cpu().numpy()


def block_features(model: nn.Module, inputs: Any, device: str = "cpu") -> dict[str, np.ndarray]:
    """Pooled features of every named block for every input (N, F each)."""
    network = unwrap(model).eval().to(device)
    collected: dict[str, list[np.ndarray]] = {}
    with torch.no_grad(), block_outputs(network) as outputs:
        for start in range(0, len(inputs), BATCH):
            index = np.arange(start, min(start + BATCH, len(inputs)))
            network(torch.from_numpy(np.asarray(inputs[index], dtype=np.float32)).to(device))
            for name, output in outputs.items():
                collected.setdefault(name, []).append(pooled(output))
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def linear_probe(train: np.ndarray, train_targets: np.ndarray, test: np.ndarray,
                 test_targets: np.ndarray, ridge: float = PROBE_RIDGE) -> float:
    """Test RMSE (over all outputs) of a ridge least-squares fit of the targets on the
    features, fitted on ``train``; features standardised on ``train``, intercept free."""
    mean, scale = train.mean(axis=0), train.std(axis=0)
    scale[scale == 0] = 1.0
    x, x_test = (train - mean) / scale, (test - mean) / scale
    target_mean = train_targets.mean(axis=0)
    y = train_targets - target_mean
    n, features = x.shape
    if features <= n:
        weights = np.linalg.solve(x.T @ x + ridge * n * np.eye(features), x.T @ y)
    else:  # the same fit in its dual form: an n x n system
        weights = x.T @ np.linalg.solve(x @ x.T + ridge * n * np.eye(n), y)
    residual = x_test @ weights + target_mean - test_targets
    return float(np.sqrt(np.mean(residual**2)))


# ----------------------------------------------------------------------------- one study


@dataclass
class Inspection:
    """What the inspector found for one trial."""

    number: int
    label: str
    layers: list[Layer]
    probe: dict[str, Any]  # blocks, rmse per block, pixels_rmse, no_information_rmse, network_rmse
    maps: dict[str, np.ndarray]  # a test example's feature maps per block (C, H, W)
    example: np.ndarray | None  # that example (C, H, W)

    def stored(self) -> dict[str, Any]:
        """The JSON-safe part kept in the study (layers and probe)."""
        return {"label": self.label, "layers": [asdict(layer) for layer in self.layers],
                "probe": self.probe}


def trial_label(trial: FrozenTrial) -> str:
    preset = trial.user_attrs.get("preset")
    return f"trial {trial.number}" + (f" (preset {preset})" if preset else "")


def load_trial(trial: FrozenTrial, storage_url: str, folder: Path) -> tuple[dict[str, Any], nn.Module]:
    """The architecture and network of a completed trial, from the artifact store."""
    download_trial_artifacts(trial, artifact_store(storage_url), folder,
                             (ARCHITECTURE_FILE, WEIGHTS_FILE))
    if not (folder / WEIGHTS_FILE).is_file():
        raise ExportError(f"trial {trial.number}: no stored {ARCHITECTURE_FILE} and "
                          f"{WEIGHTS_FILE} in the artifact store")
    return read_architecture(folder), spaces.load(folder)


def inspect_trial(trial: FrozenTrial, spec: dict[str, Any], model: nn.Module,
                  examples: dict[str, tuple[Any, np.ndarray]] | None) -> Inspection:
    """Layers of the trial's network; with ``examples`` ({"validation": ..., "test": ...}
    inputs and targets), its feature maps on the first test example and the probe."""
    if examples is None:
        x, _, _ = example_input(spec, batch=1)
    else:
        x = torch.from_numpy(np.asarray(examples["test"][0][np.arange(1)], dtype=np.float32))
    layers = layer_table(model, x)
    probe: dict[str, Any] = {}
    maps: dict[str, np.ndarray] = {}
    if examples is not None and named_blocks(model):
        with torch.no_grad(), block_outputs(unwrap(model).eval()) as outputs:
            unwrap(model)(x)
            maps = {name: out[0].numpy() for name, out in outputs.items() if out.dim() == 4}
        (val_x, val_y), (test_x, test_y) = examples["validation"], examples["test"]
        train_features, test_features = block_features(model, val_x), block_features(model, test_x)
        flat = [np.asarray(inputs[np.arange(len(inputs))], np.float64).reshape(len(inputs), -1)
                for inputs in (val_x, test_x)]
        probe = {
            "blocks": list(train_features),
            "rmse": [linear_probe(train_features[b], val_y, test_features[b], test_y)
                     for b in train_features],
            "pixels_rmse": linear_probe(flat[0], val_y, flat[1], test_y),
            "no_information_rmse": float(np.sqrt(np.mean((test_y - val_y.mean(axis=0)) ** 2))),
            "network_rmse": trial.user_attrs.get("rmse"),
            "features": [int(train_features[b].shape[1]) for b in train_features],
        }
    return Inspection(trial.number, trial_label(trial), layers, probe, maps,
                      None if examples is None else x[0].numpy())


def inspect_study(study: optuna.Study, storage_url: str, trial_number: int | None = None,
                  cache_dir: str | Path | None = None) -> list[Inspection]:
    """Inspect trial ``trial_number`` (default: the best) and the study's preset trials; the
    results are stored with the study. The first inspection is the trial's."""
    from lensnas.search.results.uncertainty import chosen_trial

    trial = chosen_trial(study, trial_number)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    presets = [t for t in complete if "preset" in t.user_attrs and t.number != trial.number]
    examples = None
    try:
        objective = study_objective(study, cache_dir)
        examples = {split: objective.examples(split) for split in ("validation", "test")}
    except OptionError:
        pass  # networks that return images: the layer table only
    inspections = []
    with tempfile.TemporaryDirectory(prefix="lensnas-inspect-") as scratch:
        for each in (trial, *presets):
            spec, model = load_trial(each, storage_url, Path(scratch) / f"trial-{each.number}")
            inspections.append(inspect_trial(each, spec, model, examples))
    stored = dict(study.user_attrs.get(INSPECTOR_ATTR) or {})
    stored.update({str(i.number): i.stored() for i in inspections})
    study.set_user_attr(INSPECTOR_ATTR, stored)
    return inspections


# ----------------------------------------------------------------------------- figures


MAPS_NOTE = (
    "The first test example (top row) and, for each block, the channels of its output that "
    "vary most over the stamp. Colour: the feature's value (each panel its own scale)."
)


def maps_figure(inspection: Inspection) -> go.Figure | None:
    """The first test example and the most varying channels of every block's feature maps."""
    if not inspection.maps or inspection.example is None:
        return None
    rows = [("input", inspection.example)] + list(inspection.maps.items())
    columns = min(MAP_CHANNELS, max(len(maps) for _, maps in rows))
    titles, panels = [], []
    for name, maps in rows:
        order = np.argsort(-maps.reshape(len(maps), -1).std(axis=1))[:columns]
        for column in range(columns):
            if column < len(order):
                titles.append(f"{name}, channel {order[column]}")
                panels.append(maps[order[column]])
            else:
                titles.append("")
                panels.append(None)
    figure = make_subplots(rows=len(rows), cols=columns, subplot_titles=titles,
                           horizontal_spacing=0.02, vertical_spacing=0.06)
    for index, panel in enumerate(panels):
        row, column = index // columns + 1, index % columns + 1
        figure.update_yaxes(scaleanchor=f"x{index + 1 if index else ''}", row=row, col=column)
        if panel is not None:
            figure.add_trace(go.Heatmap(z=panel[::-1], colorscale="Viridis", showscale=False),
                             row=row, col=column)
    figure.update_xaxes(showticklabels=False, showgrid=False)
    figure.update_yaxes(showticklabels=False, showgrid=False)
    figure.update_layout(height=170 * len(rows) + 60, margin={"t": 40})
    figure.update_annotations(font_size=10)
    return figure


def inspection_html(study_name: str, inspections: list[Inspection]) -> str:
    """The inspector's own page: layers, feature maps and probe of the inspected trial."""
    first = inspections[0]
    title = html.escape(f"lensnas inspect: {study_name}, {first.label}")
    parts = [f"<h1>{title}</h1>", "<h2>Layers</h2>", note(LAYER_NOTE),
             html_table(LAYER_HEADER, layer_rows([asdict(layer) for layer in first.layers]),
                        "layer-table")]
    maps = maps_figure(first)
    parts.append("<h2>Feature maps</h2>")
    parts.append(note(MAPS_NOTE) + figure_html(maps, "feature-maps") if maps is not None else
                 note("No feature maps: the network names no blocks, or the objective gives no "
                      "examples."))
    parts.append("<h2>Where the information is lost</h2>")
    stored = {str(i.number): i.stored() for i in inspections}
    if first.probe:
        rows = [(block, f"{features:,}", format_value(value)) for block, features, value in
                zip(first.probe["blocks"], first.probe["features"], first.probe["rmse"])]
        parts += [note(PROBE_NOTE), figure_html(probe_figure(stored), "probe-figure"),
                  html_table(("block", "probe features", "probe RMSE"), rows, "probe-table")]
    else:
        parts.append(note("No probe: the objective's networks return no numbers to probe for."))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{STYLE}</style>\n"
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>\n'
        "</head>\n<body>\n" + "\n".join(parts) + "\n</body>\n</html>\n"
    )


def write_inspection(study: optuna.Study, storage_url: str, path: str | Path | None = None,
                     trial_number: int | None = None,
                     cache_dir: str | Path | None = None) -> tuple[Path, list[Inspection]]:
    """Inspect and write the inspector's page to ``path`` (default:
    ``<study>-trial-<N>-inspect.html``); returns it and the inspections."""
    inspections = inspect_study(study, storage_url, trial_number, cache_dir)
    path = Path(path or f"{study.study_name}-trial-{inspections[0].number}-inspect.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(inspection_html(study.study_name, inspections), encoding="utf-8")
    return path, inspections

