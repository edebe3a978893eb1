"""Input statistics of a model's decoder linears, gathered while the layer stream runs.

For every ``nn.Linear`` and GPT-2 ``Conv1D`` of a decoder layer, over the rows X it is called with
(one row per token, ``in_features`` columns): ``gram`` G = XᵀX / rows and ``sqnorm`` Σ_t x_tj².
Both are float32 and accumulated in float32, one batch at a time (``addmm_``): against a float64
sum over 128 × 2048 random rows of 512 columns, a Gram is off by 2e-7 of its largest entry and its
diagonal and Σx² by 2e-6 relative; float64 accumulators would double a layer's statistics.

Forward pre-hooks live on one layer's linears while that layer runs; when it is done its statistics
are written and dropped, so memory never holds more than one layer's. Linears called with the same
tensor (q, k and v; gate and up) share one statistic, found by the identity of their input.
Statistics are keyed by the checkpoint name of the weight. Modules of a layer with a matrix that are
not linears (the fused experts and routers of transformers' MoE blocks) get none; ``skipped`` names
them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from streammerge.calibration.statsdir import StatsWriter
from streammerge.forward import LayerStream

INPUT_KINDS = ("gram", "sqnorm")


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or GPT-2's ``Conv1D`` (the same product, its weight stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def in_features(module: nn.Module) -> int:
    """The width of a linear's input rows: what its statistics are indexed by."""
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]


class _LayerInputs:
    """One layer's accumulators, filled by the pre-hooks of its linears, batch after batch."""

    def __init__(self, names: dict[nn.Module, str], kinds: tuple[str, ...]):
        self.names, self.kinds = names, kinds
        self.stats: dict[str, dict[str, torch.Tensor]] = {}  # weight -> kind -> accumulator
        self.rows: dict[str, int] = {}
        self.shared: dict[str, str] | None = None  # weight -> the weight whose input it shares
        self._call: list[tuple[torch.Tensor, str]] = []  # this batch's inputs and who took each
        self._call_shared: dict[str, str] = {}

    def start_batch(self, module: nn.Module, args: tuple) -> None:
        self._call, self._call_shared = [], {}

    def end_batch(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.shared is None:
            self.shared = self._call_shared
        elif self.shared != self._call_shared:  # the layer's code is the same for every batch
            raise RuntimeError(f"linears sharing an input changed between batches: "
                               f"{self.shared} then {self._call_shared}")
        self._call = []

    def add(self, module: nn.Module, args: tuple) -> None:
        name, x = self.names[module], args[0]
        owner = next((other for seen, other in self._call if seen is x and other != name), None)
        if owner is not None:
            self._call_shared[name] = owner
            return
        self._call.append((x, name))
        rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if name not in self.stats:
            width = rows.shape[1]
            shapes = {"gram": (width, width), "sqnorm": (width,)}
            self.stats[name] = {k: torch.zeros(shapes[k]) for k in self.kinds}
            self.rows[name] = 0
        acc = self.stats[name]
        if "gram" in acc:
            acc["gram"].addmm_(rows.T, rows)
        if "sqnorm" in acc:
            acc["sqnorm"].add_(rows.square().sum(0))
        self.rows[name] += rows.shape[0]

    def finished(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
        """The statistics (Grams divided by their rows, in place), and which weights share whose."""
        for name, acc in self.stats.items():
            if "gram" in acc:
                acc["gram"].div_(self.rows[name])
        return self.stats, dict(self.shared or {})


class InputStats:
    """A layer hook for ``LayerStream.run`` that writes each layer's input statistics with ``writer``
    as the layer finishes."""

    def __init__(self, stream: LayerStream, writer: StatsWriter, kinds: tuple[str, ...] = INPUT_KINDS):
        self.stream, self.writer, self.kinds = stream, writer, tuple(kinds)
        model = stream.skeleton.model
        self._prefix = next(n for n, m in model.named_modules() if m is stream.skeleton.layers)
        self.skipped: set[str] = set()  # layer-relative module names that have no statistics

    def _linears(self, index: int, layer: nn.Module) -> dict[nn.Module, str]:
        """The layer's linears -> the checkpoint name of each one's weight."""
        checkpoint = self.stream.weights.checkpoint_names(index)
        out = {}
        for name, module in layer.named_modules():
            weight = checkpoint.get(f"{self._prefix}.{index}.{name}.weight")
            if is_linear(module) and weight is not None:
                out[module] = weight
            elif any(p.dim() >= 2 for p in module.parameters(recurse=False)):
                self.skipped.add(name)
        return out

    @contextlib.contextmanager
    def __call__(self, index: int, layer: nn.Module) -> Iterator[None]:
        inputs = _LayerInputs(self._linears(index, layer), self.kinds)
        handles = [layer.register_forward_pre_hook(inputs.start_batch),
                   layer.register_forward_hook(inputs.end_batch)]
        handles += [m.register_forward_pre_hook(inputs.add) for m in inputs.names]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        relative = {m: n for n, m in layer.named_modules()}
        self.skipped.update(relative[m] for m, weight in inputs.names.items()
                            if weight not in inputs.stats and weight not in (inputs.shared or {}))
        with torch.inference_mode():  # the accumulators were made in inference mode
            stats, shared = inputs.finished()
        self.writer.write_layer(index, stats, shared=shared)
