"""A base model with a LoRA adapter folded in, read like any checkpoint, one row range at a time.

``AdaptedCheckpoint.read(name, rows)`` returns W[rows] + ΔW[rows], computed in float32 and rounded
to W's dtype, for an adapted module (and b + Δb for a ``lora_B.bias`` update; the
factors of one module are read once and kept until the engine releases the tensor), the
adapter's own tensor for a replaced one (``modules_to_save``), and W[rows] otherwise. Headers,
config and tokenizer are the base's, so the schedule and the engine treat it as a model: no
merged copy is ever written, and ΔW exists for one row chunk of one module at a time.

Several adapters over one base share one ``SharedCheckpoint``, which keeps the last few row
ranges it read: the engine reads the base and each adapted model's rows of a chunk back to back,
so the base's bytes are read once per chunk, not once per adapter.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from streammerge.io.reader import Checkpoint
from streammerge.lora.adapter import LoraAdapter
from streammerge.lora.reference import split_reference
from streammerge.sources import Shard

_KEPT_READS = 2  # row ranges a shared base keeps: the current chunk, and one read ahead by a prefetcher


class SharedCheckpoint(Checkpoint):
    """A checkpoint read by several adapted models: recent row ranges are kept, and close is idempotent."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._recent: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def read(self, name: str, rows: slice | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """``into`` unused: a shared read outlives the caller's buffer."""
        key = (name, None if rows is None else (rows.start, rows.stop))
        with self._lock:
            if key not in self._recent:
                self._recent[key] = super().read(name, rows)
                while len(self._recent) > _KEPT_READS:
                    self._recent.popitem(last=False)
            return self._recent[key]  # shared by every reader: methods never modify their inputs

    def prefetch(self, name: str, stop: threading.Event | None = None, direct: bool = False) -> None:
        super().prefetch(name, stop)  # ``direct`` does not apply: shared reads are mapped

    def release(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._recent if k[0] == name]:
                del self._recent[key]
        super().release(name)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            super().close()


class AdaptedCheckpoint:
    """``base`` with ``adapter`` folded in; the same interface as ``Checkpoint``."""

    def __init__(self, base: Checkpoint, adapter: LoraAdapter):
        adapter.check_base(base.tensors, base.path)
        self.base, self.adapter = base, adapter
        self.path = base.path
        self.tensors = base.tensors
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def read(self, name: str, rows: slice | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """``into`` unused: the result is a fresh product."""
        # a replaced tensor (modules_to_save, an embedding's saved base_layer) is the adapter's own
        w = self.adapter.replacement(name, rows) if name in self.adapter.replaced else self.base.read(name, rows)
        if name in self.adapter.biases:  # lora_bias: rounded to the base's dtype as a folded weight is
            return self.adapter.bias_update(name, rows).add_(w).to(w.dtype)
        if name not in self.adapter.modules:
            return w
        if name not in self._factors:  # float32, or float64 for a float64 base
            self._factors[name] = tuple(f.to(torch.promote_types(f.dtype, w.dtype)) for f in self.adapter.factors(name))
        left, right = self._factors[name]
        # in place on the fresh product: one float32 chunk, no widened copy of W; then rounded to the
        # base's dtype, as mergekit (PEFT's merge_and_unload on the model as stored) hands it on
        return ((left if rows is None else left[rows]) @ right).add_(w).to(w.dtype)

    def fingerprint(self) -> dict[str, tuple[int, str]]:
        """The base's files and the adapter's (keyed by the adapter's path): whether either changed."""
        return {**self.base.fingerprint(), **{f"{self.adapter.path}/{f}": v for f, v in self.adapter.fingerprint().items()}}

    def prefetch(self, name: str, stop: threading.Event | None = None, direct: bool = False) -> None:
        self.base.prefetch(name, stop)  # ``direct`` does not apply: ``read`` never reads into a buffer

    def release(self, name: str) -> None:
        self._factors.pop(name, None)
        self.base.release(name)

    def file_of(self, name: str) -> Path:
        return self.base.file_of(name)

    def offset_of(self, name: str) -> int:
        return self.base.offset_of(name)

    def shard_of(self, name: str) -> Shard:
        return self.base.shard_of(name)

    def config(self) -> dict:
        return self.base.config()

    def close(self) -> None:
        self.adapter.close()
        self.base.close()


def open_checkpoints(refs: list[str]) -> list[Checkpoint | AdaptedCheckpoint]:
    """One checkpoint per reference (``model`` or ``model+adapter``); models under adapters are
    opened once and shared. Everything opened is closed again if any reference fails."""
    split = [split_reference(r) for r in refs]
    shared = {model for model, adapter in split if adapter is not None}
    bases: dict[str, Checkpoint] = {}
    out: list[Checkpoint | AdaptedCheckpoint] = []
    try:
        for model, adapter in split:
            if model not in bases:
                bases[model] = SharedCheckpoint(model) if model in shared else Checkpoint(model)
            if adapter is None:
                out.append(bases[model])
            else:
                lora = LoraAdapter(adapter)
                try:
                    out.append(AdaptedCheckpoint(bases[model], lora))
                except BaseException:
                    lora.close()
                    raise
        return out
    except BaseException:
        for c in out:
            if isinstance(c, AdaptedCheckpoint):
                c.adapter.close()
        for base in bases.values():
            base.close()
        raise
