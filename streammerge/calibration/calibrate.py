"""``calibrate``: a model's statistics on calibration data, written as a statistics directory, and
``cached_stats``: the same through a cache keyed by the model and the data source.

The windows are ``streammerge eval``'s non-overlapping ones: the documents joined with "\\n\\n",
tokenized once, cut into ``seqlen``-token windows (the tail dropped), the first ``samples`` kept.
With ``shuffle``, ``samples`` windows are drawn instead: the windows at the first ``samples``
positions of ``torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))``, in that
order (each window at most once, never overlapping). Input statistics (gram, sqnorm) come from one
pass of the layer stream; the Fisher information from its own forward and backward sweep.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from streammerge.calibration.collect import INPUT_KINDS, InputStats, in_features, is_linear
from streammerge.calibration.statsdir import (FORMAT, KINDS, MANIFEST, Provenance, StatsWriter, cache_key,
                                              data_fingerprint, files_fingerprint, model_fingerprint,
                                              source_identity)
from streammerge.errors import DataError, OutputError, PlanError
from streammerge.evaluation.data import read_documents
from streammerge.evaluation.evaluate import (BATCH_TOKENS, default_activation_budget, _batches, _run_dtype,
                                             load_tokenizer, open_model)
from streammerge.evaluation.windows import Protocol, Window, cut_windows, tokenize
from streammerge.forward import Batch, LayerStream
from streammerge.forward.weights import Source
from streammerge.io.layout import TOKENIZER_FILES

CACHE_ENV = "STREAMMERGE_CACHE"
DEFAULT_CACHE = Path("~/.cache/streammerge/stats")
SPEC_KEYS = ("data", "samples", "seqlen", "shuffle", "seed", "text_field")


def default_cache_dir() -> Path:
    """``$STREAMMERGE_CACHE``, else ``~/.cache/streammerge/stats``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def check_kinds(kinds: Sequence[str]) -> list[str]:
    """The statistics asked for, each known and named once."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise PlanError(f"statistics {','.join(kinds) or '(none)'}: unknown kind "
                        f"{unknown[0] if unknown else '(none given)'!r}; choose from {','.join(KINDS)}")
    return list(dict.fromkeys(kinds))


def calibration_windows(tokenizer: Any, documents: list[str], seqlen: int, samples: int, shuffle: bool,
                        seed: int) -> tuple[list[Window], dict[str, Any]]:
    """The calibration windows of ``documents`` and the protocol that cut them (for the manifest)."""
    protocol = Protocol(seqlen=seqlen, samples=samples)
    ids = tokenize(tokenizer, documents, protocol.join)
    if shuffle:
        every = cut_windows(ids, Protocol(seqlen=seqlen))
        order = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))
        windows = [every[k] for k in order[:samples].tolist()]
    else:
        windows = cut_windows(ids, protocol)
    if len(windows) < samples:
        warnings.warn(f"the data gives {len(windows)} window(s) of {seqlen} tokens, fewer than "
                      f"samples={samples}; calibrating on {len(windows)}", stacklevel=2)
    described = protocol.as_dict() | {"shuffle": shuffle, "seed": seed if shuffle else None}
    if shuffle:
        described["description"] = described["description"].replace(
            f"the first {samples} kept", f"{samples} drawn by torch.randperm with seed {seed}")
    return windows, described


def _stats_bytes(stream: LayerStream, kinds: list[str]) -> int:
    """What one layer's input statistics can take: every linear with its own, in float32."""
    per_layer = []
    for layer in stream.skeleton.layers:
        widths = [in_features(m) for m in layer.modules() if is_linear(m)]
        per_layer.append(sum(w * w * ("gram" in kinds) + w * ("sqnorm" in kinds) for w in widths))
    return 4 * max(per_layer, default=0)


def _is_stats_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_output(out: Path) -> None:
    """``out`` is replaced when done: refuse anything but nothing, an empty directory or a
    statistics directory."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_stats_dir(out))):
        raise OutputError(f"{out}: exists and is not a statistics directory; choose another -o "
                          "(a statistics directory there is replaced)")


def _compute(stream: LayerStream, windows: list[Window], kinds: list[str], provenance: Provenance,
             out: Path, max_memory: int | None, batch_tokens: int = BATCH_TOKENS) -> Path:
    """Run the calibration passes over ``windows`` and write ``out``."""
    input_kinds = tuple(k for k in kinds if k in INPUT_KINDS)
    # Without --max-memory the activation budget would be half the free memory, and a layer's
    # inputs and outputs (128 MiB each on 7B shapes at 32 × 512 tokens; every layer's for the
    # Fisher) would stay in it beside two layers and their statistics. They are all spilled
    # instead: on 7B shapes a layer computes for 50 s or more, its spill I/O takes < 1 s.
    budget = 0 if max_memory is None else default_activation_budget(stream, max_memory, batch_tokens)
    if max_memory is not None:
        held = _stats_bytes(stream, kinds)
        if budget < held:
            raise PlanError(f"--max-memory {max_memory / 2**30:.2f} GiB leaves {budget / 2**30:.2f} GiB "
                            "besides running the model, less than one layer's statistics "
                            f"({held / 2**30:.2f} GiB); raise --max-memory")
        budget -= held
    stream.activation_budget = budget
    writer = StatsWriter(out, provenance, kinds)
    try:
        if input_kinds:
            collector = InputStats(stream, writer, input_kinds)
            groups = _batches(windows, batch_tokens)
            batches = [Batch(torch.stack([windows[i].ids for i in g])) for g in groups]
            stream.run(batches, hook=collector).close()
            if collector.skipped:
                skipped = ", ".join(sorted(collector.skipped))
                warnings.warn(f"no {'/'.join(input_kinds)} statistics for {skipped} in each decoder layer: "
                              "not linear layers (transformers' fused MoE experts and routers); data-aware "
                              "methods rank their weights by magnitude", stacklevel=3)
        if "fisher" in kinds:
            from streammerge.calibration.fisher import fisher_stats

            for index, stats in fisher_stats(stream, windows):
                writer.write_layer(index, stats)
                # dropped before the next layer is computed: the loop variable would keep this
                # layer's Fisher (808 MiB on 7B shapes) alive beside the next one
                del stats
        return writer.finish()
    except BaseException:
        writer.abandon()
        raise


def _prepare(model: str | Path, data: str | Path | list[str], model_dir: Path, checkpoint: Source, *,
             samples: int, seqlen: int, shuffle: bool, seed: int, text_field: str,
             dtype: str) -> tuple[list[Window], Provenance, torch.dtype]:
    """The windows, what the manifest says about them, and the dtype the model runs in."""
    documents = list(data) if isinstance(data, list) else read_documents(str(data), text_field)
    tokenizer = load_tokenizer(model_dir)
    windows, protocol = calibration_windows(tokenizer, documents, seqlen, samples, shuffle, seed)
    run_dtype = _run_dtype(checkpoint, dtype)
    protocol["dtype"] = str(run_dtype).removeprefix("torch.")  # the statistics depend on it
    provenance = Provenance(
        model=str(model), model_fingerprint=model_fingerprint(checkpoint.fingerprint()),
        data=f"{len(data)} documents" if isinstance(data, list) else str(data),
        data_fingerprint=data_fingerprint([w.ids for w in windows]), protocol=protocol,
        tokens=sum(len(w.ids) for w in windows), windows=len(windows))
    return windows, provenance, run_dtype


def _weights_place(model_dir: Path, checkpoint: Source) -> list[Any]:
    """Where the weights files are and when they were written (as make judges a file): fine-tunes
    of one base have the same file sizes and headers, which alone would give them one cache entry."""
    files = sorted(checkpoint.fingerprint())
    return [str(model_dir.resolve()),
            [(model_dir / f).stat().st_mtime_ns for f in files if (model_dir / f).is_file()]]


def _run(model: str | Path, data: str | Path | list[str], kinds: list[str], window_options: dict[str, Any],
         *, out: Path | None = None, cache_root: Path | None = None, dtype: str, max_memory: int | None,
         cache_dir: str | None, batch_tokens: int = BATCH_TOKENS, progress: bool = False) -> Path:
    """Open the model, cut the windows and compute into ``out``, or into the cache entry under
    ``cache_root`` unless it is there."""
    model_dir, checkpoint = open_model(model, cache_dir)
    try:
        if cache_root is not None:  # the key needs no data read: a hit reads none
            tokenizer = files_fingerprint([model_dir / f for f in TOKENIZER_FILES])
            identity = model_fingerprint({**checkpoint.fingerprint(), "tokenizer": tokenizer,
                                          "where": _weights_place(model_dir, checkpoint)})
            options = {**window_options, "dtype": str(_run_dtype(checkpoint, dtype))}
            out = cache_root / cache_key(identity, source_identity(data, window_options["text_field"]),
                                         options, kinds)
            if (out / MANIFEST).is_file():  # directories appear complete: a manifest means done
                return out
            cache_root.mkdir(parents=True, exist_ok=True)
        windows, provenance, run_dtype = _prepare(model, data, model_dir, checkpoint, dtype=dtype,
                                                  **window_options)
        stream = LayerStream(model_dir, checkpoint, dtype=run_dtype, activation_budget=0)
        stream.progress = progress
        return _compute(stream, windows, kinds, provenance, out, max_memory, batch_tokens)
    finally:
        checkpoint.close()


def calibrate(model: str | Path, data: str | Path | list[str] | None, *, samples: int = 128,
              seqlen: int = 2048, shuffle: bool = False, seed: int = 0, kinds: Sequence[str] = INPUT_KINDS,
              out: str | Path, text_field: str = "text", dtype: str = "auto", max_memory: int | None = None,
              cache_dir: str | None = None, batch_tokens: int = BATCH_TOKENS,
              progress: bool = False) -> Path:
    """Compute ``kinds`` of statistics of ``model`` (a directory, ``org/name[@revision]``,
    ``model+adapter``) on ``data`` (a file, a dataset as ``name[:config]:split``, or a list of
    documents) and write them to the statistics directory ``out``. ``cache_dir`` is where models
    named on the Hub are downloaded; ``batch_tokens`` how many tokens run through a layer at once."""
    kinds = check_kinds(kinds)
    if data is None:
        raise DataError(f"{model}: no calibration data; give --data FILE "
                        "(or a dataset as name[:config]:split)")
    out = Path(out)
    _check_output(out)
    options = {"samples": samples, "seqlen": seqlen, "shuffle": shuffle, "seed": seed,
               "text_field": text_field}
    return _run(model, data, kinds, options, out=out, dtype=dtype, max_memory=max_memory, cache_dir=cache_dir,
                batch_tokens=batch_tokens, progress=progress)


def _spec_values(spec: dict[str, Any]) -> dict[str, Any]:
    """A plan's ``calibration: {data, samples, seqlen, shuffle, seed, text_field}``, defaults filled."""
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise PlanError(f"calibration: unknown key {unknown[0]!r}; expected {', '.join(SPEC_KEYS)} "
                        "(or stats: DIR alone, for statistics computed before)")
    if "data" not in spec:
        raise PlanError("calibration: no 'data'; give data: FILE (or a dataset as name[:config]:split)")
    values = {"samples": 128, "seqlen": 2048, "shuffle": False, "seed": 0, "text_field": "text", **spec}
    types = {"samples": int, "seqlen": int, "seed": int, "shuffle": bool, "text_field": str}
    for key, kind in types.items():
        value = values[key]
        if not isinstance(value, kind) or kind is int and isinstance(value, bool):
            raise PlanError(f"calibration: {key}: {value!r} is not a{'n' * (kind is int)} {kind.__name__}")
    return values


def cached_stats(model: str | Path, spec: dict[str, Any], kinds: Sequence[str] = INPUT_KINDS,
                 cache_dir: str | Path | None = None, *, dtype: str = "auto", max_memory: int | None = None,
                 model_cache_dir: str | None = None, progress: bool = False) -> Path:
    """The statistics directory of ``model`` under the calibration ``spec`` (a plan's
    ``calibration:`` mapping): ``cache_dir/<cache_key>``, computed when missing and reused when
    present. The key covers the model's weights and tokenizer, the data source (a file's path, size
    and modification time; a dataset's name), the options and the kinds: a hit reads no data and
    runs no model."""
    kinds = check_kinds(kinds)
    options = _spec_values(spec)
    data = options.pop("data")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _run(model, data, kinds, options, cache_root=root, dtype=dtype, max_memory=max_memory,
                cache_dir=model_cache_dir, progress=progress)
