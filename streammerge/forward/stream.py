"""Run a checkpoint's decoder one layer at a time over batches of token windows.

The model's own forward prepares what its layers are called with: each layer's ``forward`` is
swapped for a recorder and the decoder is called once per batch shape, so the recorded arguments
are exactly what the model would pass (masks per attention type, position ids, rotary position
embeddings, a KV cache), whatever the architecture and transformers version. The recorder at the
first layer also keeps its input, the embedded batch. Then, per layer: its weights are loaded
(the next layer's are read meanwhile on a thread), every batch runs through it, and it goes back
to meta. The GPTQ/SparseGPT calibration loop does the same with a hand-written capture; it
only records ``attention_mask`` (and ``position_ids``), which newer layers no longer accept alone.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from streammerge.forward.activations import ActivationStore
from streammerge.forward.skeleton import build_skeleton
from streammerge.forward.weights import LayerWeights, Source

LayerHook = Callable[[int, nn.Module], contextlib.AbstractContextManager]


@dataclass
class Batch:
    """Token windows of one length: ``ids`` [b, s]. Generation adds a padding mask and positions."""

    ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def shape_key(self) -> tuple:
        return tuple(self.ids.shape), self.attention_mask is None


class _Recorded(Exception):
    """Raised by a recorder to stop the decoder once what was needed is recorded."""


@dataclass
class _Call:
    args: tuple  # positional arguments after the hidden states
    kwargs: dict[str, Any]


class LayerStream:
    """A checkpoint run layer by layer. ``checkpoint`` is an opened ``Checkpoint`` or
    ``AdaptedCheckpoint`` whose config.json (and tokenizer) are in ``model_dir``."""

    def __init__(self, model_dir: Path, checkpoint: Source, *, dtype: torch.dtype,
                 activation_budget: int, spill_dir: str | None = None, trust_remote_code: bool = False):
        self.skeleton = build_skeleton(model_dir, dtype, trust_remote_code)
        self.weights = LayerWeights(self.skeleton, checkpoint)
        self.weights.load_resident()
        self.activation_budget, self.spill_dir = activation_budget, spill_dir
        self.spilled_bytes = 0
        self.progress = False  # a bar over the layers of each run
        params = inspect.signature(self.skeleton.base.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def layer_count(self) -> int:
        return len(self.skeleton.layers)

    def layer_bytes(self) -> int:
        """The largest layer's size in the run's dtype: what one loaded layer costs."""
        info = self.weights.checkpoint.tensors
        return max(sum(math.prod(info[k].shape) for k in keys) for keys in self.weights.layer_keys.values()) \
            * self.skeleton.dtype.itemsize

    # -- the decoder's own preparation -------------------------------------------------------

    def _embedding_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding rows of the tokens in ``ids``, and ``ids`` renumbered into them."""
        used = torch.unique(ids)
        return self.weights.rows(self.weights.embedding_key, used), torch.searchsorted(used, ids)

    @contextlib.contextmanager
    def _compact_embedding(self, rows: torch.Tensor) -> Iterator[None]:
        emb = self.skeleton.embedding
        meta, padding_idx = emb.weight, getattr(emb, "padding_idx", None)
        # padding only matters to grads (a caller differentiating by the rows handles it)
        emb.weight = rows if isinstance(rows, nn.Parameter) else nn.Parameter(rows, requires_grad=False)
        emb.padding_idx = None
        try:
            yield
        finally:
            emb.weight, emb.padding_idx = meta, padding_idx

    def prepare(self, batch: Batch, cache: Any = None, upto: int | None = None,
                rows: nn.Parameter | None = None) -> tuple[torch.Tensor, list[_Call]]:
        """The embedded batch and the calls of layers 0..upto (default: all) as the model makes them.
        ``cache`` is a KV cache to attend to and fill, or ``True`` for a new one (generation).
        ``rows`` are the embedding rows of ``torch.unique(batch.ids)`` to embed with instead of the
        checkpoint's; given, the decoder runs outside inference mode, so autograd can differentiate
        the embedded batch by them (calibration's Fisher) and the calls hold ordinary tensors."""
        layers = self.skeleton.layers
        last = len(layers) - 1 if upto is None else upto
        calls: list[_Call] = []
        first: list[torch.Tensor] = []

        def recorder(index: int) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                hidden = args[0] if args else kwargs.pop("hidden_states")
                calls.append(_Call(args[1:], kwargs))
                if index == 0:
                    first.append(hidden)
                if index == last:
                    raise _Recorded
                return hidden
            return forward

        given = rows is not None
        if rows is None:
            rows, compact = self._embedding_rows(batch.ids)
        else:
            compact = torch.searchsorted(torch.unique(batch.ids), batch.ids)
        extra = {}
        if cache is not None:
            extra = {"use_cache": True, **({} if cache is True else {self._cache_kwarg: cache})}
        for i in range(last + 1):
            layers[i].forward = recorder(i)
        try:
            with self._compact_embedding(rows), torch.inference_mode(not given):
                self.skeleton.base(input_ids=compact, attention_mask=batch.attention_mask,
                                   position_ids=batch.position_ids, **extra)
        except _Recorded:
            pass
        finally:
            for i in range(last + 1):
                del layers[i].forward
        if len(calls) != last + 1:
            raise RuntimeError(f"{type(self.skeleton.base).__name__} called {len(calls)} of its layers, "
                               f"not {last + 1}")
        return first[0], calls

    # -- the layer loop -------------------------------------------------------------------------

    def run(self, batches: list[Batch], cache: Any = None, hook: LayerHook | None = None) -> ActivationStore:
        """Every batch through every layer; the store holds the last layer's output per batch index.
        ``hook(i, layer)`` is entered around layer ``i`` while it runs (calibration statistics).
        With ``cache`` (one batch), the layers attend to and extend it; see ``prepare``."""
        store = ActivationStore(self.activation_budget, self.spill_dir)
        try:
            calls = self._prepare_all(batches, store, cache)
            self._layers(len(batches), calls, store, hook)
        except BaseException:
            store.close()
            raise
        self.spilled_bytes = max(self.spilled_bytes, store.spilled_bytes)
        return store

    def _prepare_all(self, batches: list[Batch], store: ActivationStore, cache: Any) -> list[list[_Call]]:
        by_shape: dict[tuple, list[_Call]] = {}
        calls = []
        for b, batch in enumerate(batches):
            # without padding, batches of one shape get the same layer arguments: record them once
            key = batch.shape_key()
            known = cache is None and key in by_shape
            hidden, recorded = self.prepare(batch, cache, upto=0 if known else None)
            if not known:
                by_shape[key] = recorded
            calls.append(recorded if cache is not None else by_shape[key])
            store.put(b, hidden)
        return calls

    def _layers(self, n: int, calls: list[list[_Call]], store: ActivationStore,
                hook: LayerHook | None) -> None:
        keys = self.weights.layer_keys
        with ThreadPoolExecutor(1, thread_name_prefix="streammerge-layer-read") as reader:
            ahead = reader.submit(self.weights.read, keys[0])
            for i, layer in enumerate(tqdm(self.skeleton.layers, desc="layers", unit="layer", leave=False,
                                           disable=not self.progress)):
                tensors = ahead.result()
                if i + 1 < self.layer_count:
                    ahead = reader.submit(self.weights.read, keys[i + 1])
                self.weights.load(tensors, [layer], f"layer {i}")
                del tensors
                try:
                    with hook(i, layer) if hook else contextlib.nullcontext(), torch.inference_mode():
                        for b in range(n):
                            call = calls[b][i]
                            out = layer(store.get(b), *call.args, **call.kwargs)
                            store.put(b, out[0] if isinstance(out, tuple) else out)
                finally:
                    self.weights.release(i)
