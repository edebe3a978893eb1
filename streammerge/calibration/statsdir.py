"""A statistics directory: what calibration measured about one model, stored like weights.

```
STATS/manifest.json            format, where the numbers came from (model and data fingerprints,
                               protocol, tokens), and for each weight and kind the file and stored name
STATS/layer-00007-gram-sqnorm.safetensors  per decoder layer and pass, float32
STATS/outside-layers-fisher.safetensors    the embedding, final norm and head (Fisher only)
```

A statistic is named after the checkpoint weight it describes (``model.layers.7.mlp.down_proj.weight``
and kind ``gram``), so a merge reads it per tensor as it reads the weight. Weights that share an
input (q, k and v) may share one stored Gram. A directory appears only complete: it is written
under a temporary name and renamed when the manifest is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from streammerge.errors import CheckpointError
from streammerge.io.reader import ShardReader
from streammerge.io.safetensors_format import build_header
from streammerge.io.writer import ShardWriter, fsync_dir

FORMAT = "streammerge-stats/1"
MANIFEST = "manifest.json"
# gram: XᵀX / tokens over a linear's inputs [in, in]; sqnorm: Σ_t x_tj² [in];
# fisher: mean over windows of the squared gradient of the window's mean NLL, the weight's shape
KINDS = ("gram", "sqnorm", "fisher")


@dataclass(frozen=True)
class Provenance:
    """Where the numbers came from: enough to tell whether they still describe a model and data."""

    model: str  # the model reference as given
    model_fingerprint: str  # model_fingerprint() of the checkpoint
    data: str  # the data source as given
    data_fingerprint: str  # data_fingerprint() of the calibration token windows
    protocol: dict[str, Any]  # how the windows were cut (Protocol.as_dict(), shuffle, seed)
    tokens: int  # tokens the input statistics average over
    windows: int


def model_fingerprint(fingerprint: dict[str, Any]) -> str:
    """A digest of ``Checkpoint.fingerprint()`` (each weights file's size and header sha256)."""
    return hashlib.sha256(json.dumps(sorted(fingerprint.items()), default=list).encode()).hexdigest()


def data_fingerprint(windows: list[torch.Tensor]) -> str:
    """A digest of the calibration token ids, window by window."""
    h = hashlib.sha256()
    for ids in windows:
        h.update(len(ids).to_bytes(8, "little"))
        h.update(ids.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


def cache_key(model_fp: str, source: str, options: dict[str, Any], kinds: list[str]) -> str:
    """The name of a cache entry, known before any data is read: the same model (weights and
    tokenizer), data source (``source_identity``), options and kinds give the same key."""
    key = json.dumps([model_fp, source, options, sorted(kinds)], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def source_identity(data: str | Path | list[str], text_field: str) -> str:
    """What the calibration data is, without reading it: a file by path, size and modification
    time (as make judges it), a dataset by its name, in-memory documents by a digest."""
    if isinstance(data, list):
        return "documents:" + hashlib.sha256("\0".join(data).encode()).hexdigest()
    path = Path(data)
    if path.is_file():
        st = path.stat()
        return f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{text_field}"
    return f"dataset:{data}:{text_field}"


def files_fingerprint(paths: list[Path]) -> str:
    """A digest of small files' names and bytes (a tokenizer's), those that exist."""
    h = hashlib.sha256()
    for path in sorted(p for p in paths if p.is_file()):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


class StatsWriter:
    """Writes a statistics directory one layer at a time; ``finish`` makes it appear."""

    def __init__(self, directory: Path, provenance: Provenance, kinds: list[str]):
        self.directory = Path(directory)
        self.staging = self.directory.with_name(f".{self.directory.name}.partial-{os.getpid()}")
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self.provenance, self.kinds = provenance, list(kinds)
        self.entries: dict[str, dict[str, list[str]]] = {}  # weight -> kind -> [file, stored name]

    def write_layer(self, index: int, stats: dict[str, dict[str, torch.Tensor]],
                    shared: dict[str, str] | None = None) -> None:
        """``stats[weight][kind]`` for one layer's weights; ``shared[weight] = other`` makes ``weight``
        use ``other``'s input statistics (gram, sqnorm) instead of storing its own."""
        # one file per layer and kind set: a second pass over a layer (Fisher after the Grams) adds a file
        written = "-".join(sorted({kind for kinds in stats.values() for kind in kinds}))
        file = f"{'outside-layers' if index < 0 else f'layer-{index:05d}'}-{written}.safetensors"
        tensors = {}
        for weight, kinds in stats.items():
            for kind, value in kinds.items():
                tensors[f"{weight}:{kind}"] = value.detach().to(torch.float32)
                self.entries.setdefault(weight, {})[kind] = [file, f"{weight}:{kind}"]
        for weight, other in (shared or {}).items():
            for kind in ("gram", "sqnorm"):
                if kind in self.entries.get(other, {}):
                    self.entries.setdefault(weight, {})[kind] = self.entries[other][kind]
        if tensors:
            # written from the tensors themselves: safetensors' save_file first copies every one
            # into bytes, a second layer of statistics in memory (808 MiB of a 7B layer's Fisher)
            header, offsets = build_header([(k, torch.float32, tuple(v.shape)) for k, v in tensors.items()],
                                           {"format": "pt"})
            writer = ShardWriter(self.staging / file, header,
                                 len(header) + sum(v.nbytes for v in tensors.values()))
            try:
                for name, value in tensors.items():
                    writer.write(offsets[name], value)
            finally:
                writer.close()

    def finish(self) -> Path:
        manifest = {"format": FORMAT, "provenance": asdict(self.provenance), "kinds": self.kinds,
                    "tensors": self.entries}
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for f in self.staging.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if self.directory.exists():
            shutil.rmtree(self.directory)
        os.rename(self.staging, self.directory)
        fsync_dir(self.directory.parent)
        return self.directory

    def abandon(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


class StatsDir:
    """A finished statistics directory, read a tensor (or rows of one) at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: not a statistics directory (no {MANIFEST}); "
                                  "write one with streammerge calibrate") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{manifest_path}: not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        self.provenance = Provenance(**manifest["provenance"])
        self.kinds: list[str] = manifest["kinds"]
        self.entries: dict[str, dict[str, list[str]]] = manifest["tensors"]
        self._files: dict[str, ShardReader] = {}

    def has(self, weight: str, kind: str) -> bool:
        return kind in self.entries.get(weight, {})

    def _where(self, weight: str, kind: str) -> tuple[ShardReader, str]:
        if not self.has(weight, kind):
            raise CheckpointError(f"{self.path}: no {kind} statistics for {weight!r}")
        file, name = self.entries[weight][kind]
        if file not in self._files:
            self._files[file] = ShardReader(self.path / file)
        return self._files[file], name

    def shape(self, weight: str, kind: str) -> tuple[int, ...]:
        reader, name = self._where(weight, kind)
        return reader.entries[name].shape

    def read(self, weight: str, kind: str, rows: slice | None = None) -> torch.Tensor:
        reader, name = self._where(weight, kind)
        return reader.read(name, rows)

    def release(self, weight: str, kind: str) -> None:
        reader, name = self._where(weight, kind)
        reader.release(name)

    def close(self) -> None:
        for reader in self._files.values():
            reader.close()
        self._files.clear()
