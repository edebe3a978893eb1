"""Build a mixture of experts from a mergekit-moe config, through the merge engine.

The MoE is a schedule of copies: every output tensor is one input tensor, rounded to the output
dtype — the base's attention, norms and embeddings, each expert's MLP projections once per layer
under the expert's name (with its noise and residual scale, ``moe.expert``), and the routers. The
routers are computed first (``moe.routers``: small, [layers, experts, hidden]) and written as a
checkpoint of their own inside the staging directory, so that they too are read by the engine's
reader, written by its writer, journalled and checksummed like any other tensor: the output is
written chunk by chunk within the memory budget (although it is several times the size of each
input), a killed build resumes where it stopped, and ``streammerge verify`` checks it.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from streammerge.device import CPU
from streammerge.engine import MergeResult
from streammerge.errors import CheckpointError, OutputError, PlanError, StreamMergeError
from streammerge.executors.local import merge_weights
from streammerge.finalize import write_model_files
from streammerge.io.reader import Checkpoint
from streammerge.io.writer import StagedOutput
from streammerge.journal import Journal, discard_journals
from streammerge.lora.overlay import open_checkpoints
from streammerge.methods.base import TensorParams
from streammerge.moe.architecture import (
    PROJECTIONS,
    OutputArchitecture,
    output_config,
    select_architecture,
)
from streammerge.moe.config import Expert, MoEConfig, load_config
from streammerge.moe.expert import EXPERT, expert_params
from streammerge.moe.routers import degenerate_layers, gate_vectors
from streammerge.plan.architecture import is_pre_layer, layer_index
from streammerge.plan.load import PlanWarning, resolve_model
from streammerge.plan.schema import MergePlan
from streammerge.schedule import (
    DTYPES,
    Schedule,
    Source,
    TensorJob,
    bytes_per_element,
    finish_schedule,
    chunk_rows,
    working_budget,
)
from streammerge.verify import MANIFEST, manifest

COMPUTED = "moe-computed"  # the routers' checkpoint, in the staging directory until the commit
_ROUTER, _SHARED_ROUTER, _BIAS = "router.{}", "shared_router.{}", "zero_bias.{}"
_SKIPPED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; no model loads them


@dataclass(frozen=True)
class _Inputs:
    """The config's models, resolved and opened: checkpoint index of the base (0), of each expert
    and of each shared expert."""

    paths: list[str]
    checkpoints: list[Any]
    experts: list[int]
    shared: list[int]


def build_moe(
    config_file: str | Path,
    output: str | Path,
    *,
    overwrite: bool = False,
    restart: bool = False,
    quiet: bool = False,
    seed: int = 0,
    shard_size: int | None = None,
    max_memory: int | None = None,
    chunk_size: int | None = None,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    allow_all_same: bool = False,
    cache_dir: str | None = None,
) -> MergeResult:
    """Build the MoE that ``config_file`` (mergekit-moe's format) describes into ``output``.
    ``seed`` draws the random gate modes and the experts' noise; the same seed gives the same bytes.
    ``max_memory`` bounds the peak (the copies are chunked to fit it), ``chunk_size`` sets the
    elements per chunk instead."""
    started = time.perf_counter()
    config = load_config(config_file, allow_all_same)
    root = Path(config_file).parent
    destination = Path(output).expanduser().absolute()
    inputs = _open_inputs(config, root, cache_dir)
    sched = None
    try:
        base = inputs.checkpoints[0]
        types = [
            str(inputs.checkpoints[c].config().get("model_type"))
            for c in [0, *inputs.experts, *inputs.shared]
        ]
        arch = select_architecture(config, types, str(config_file))
        layers = int(base.config().get("num_hidden_layers") or 0)
        if layers < 1:
            raise CheckpointError(
                f"{base.path}/config.json: no num_hidden_layers; the base must be a decoder LLM"
            )
        _check_experts(inputs, layers)
        out_dtype = _out_dtype(config, base)
        for c in inputs.checkpoints:
            if c.path.resolve() == destination or c.path.resolve() in destination.parents:
                raise OutputError(
                    f"{destination}: the output may not be an input model directory or inside one"
                )
        donor = _tokenizer_donor(config, root, cache_dir)
        staged = StagedOutput(destination, overwrite, restart)
        options = {"seed": seed, "copy_tokenizer": copy_tokenizer, "output": str(destination),
                   "tokenizer_source": donor, "shard_size": shard_size,
                   "max_memory": max_memory, "chunk_size": chunk_size}
        sched = _staged_schedule(staged, options, config, inputs, arch, layers, out_dtype, quiet)
        return _run(
            sched, staged, config_file, config, arch, out_dtype, write_model_card, quiet, started
        )
    finally:
        if sched is not None:
            sched.close()
        else:
            for c in inputs.checkpoints:
                c.close()


def _staged_schedule(staged: StagedOutput, options: dict[str, Any], config: MoEConfig,
                     inputs: _Inputs, arch: OutputArchitecture, layers: int,
                     out_dtype: torch.dtype | None, quiet: bool) -> Schedule:
    """The routers computed into the staging directory, and the schedule that copies everything.
    A staging directory this call created is removed again if either fails (too small a
    --max-memory, say): nothing is left behind until the first tensor is written."""
    fresh = not any(staged.staging.iterdir())
    try:
        computed = _computed(config, inputs, arch, layers, staged, options["seed"], quiet,
                             options["max_memory"])
        try:
            plan = MergePlan.model_validate(
                {"merge_method": "passthrough", "write_model_card": False,
                 "models": [{"model": p} for p in [*inputs.paths, str(computed.path)]],
                 **{k: v for k, v in options.items() if v is not None}})
            return _schedule(plan, config, inputs, arch, (*inputs.checkpoints, computed), layers,
                             out_dtype)
        except BaseException:
            computed.close()
            raise
    except BaseException:
        if fresh:
            shutil.rmtree(staged.staging, ignore_errors=True)
        raise


def _open_inputs(config: MoEConfig, root: Path, cache_dir: str | None) -> _Inputs:
    refs = [
        config.base_model,
        *(e.source_model for e in config.experts),
        *(e.source_model for e in config.shared_experts or []),
    ]
    resolved = [resolve_model(r, cache_dir, root) for r in refs]
    paths = list(dict.fromkeys(resolved))  # a model used twice is opened once
    checkpoints = open_checkpoints(paths)
    index = [paths.index(r) for r in resolved]
    n = len(config.experts)
    return _Inputs(paths, checkpoints, index[1 : 1 + n], index[1 + n :])


def _tokenizer_donor(config: MoEConfig, root: Path, cache_dir: str | None) -> str | None:
    """The model whose tokenizer files the output gets (None: the base's). The MoE keeps the
    base's embeddings, so a built vocabulary (``union``) cannot apply."""
    donor = config.tokenizer_donor
    if donor == "union":
        raise PlanError("tokenizer_source: union builds a vocabulary, but a MoE keeps the base's embeddings; "
                        "use base, or a model with the base's vocabulary")
    return None if donor is None else resolve_model(donor, cache_dir, root)


def _mlp(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def _check_experts(inputs: _Inputs, layers: int) -> None:
    """Every expert has the MLP of every layer, of the base's shapes (or the first expert's)."""
    base = inputs.checkpoints[0]
    for c in dict.fromkeys([*inputs.experts, *inputs.shared]):
        ckpt = inputs.checkpoints[c]
        for i in range(layers):
            for proj in PROJECTIONS:
                name = _mlp(i, proj)
                if name not in ckpt.tensors:
                    raise CheckpointError(
                        f"{ckpt.path}: tensor {name!r} missing; an expert needs the dense MLP "
                        f"({', '.join(PROJECTIONS)}) of each of the base's {layers} layers"
                    )
                ref = base if name in base.tensors else inputs.checkpoints[inputs.experts[0]]
                want, got = tuple(ref.tensors[name].shape), tuple(ckpt.tensors[name].shape)
                if got != want:
                    raise CheckpointError(
                        f"{ckpt.path}: tensor {name!r} is {list(got)}, {ref.path} has {list(want)}; "
                        "every expert must have the base model's shapes (a fine-tune of it)"
                    )


def _out_dtype(config: MoEConfig, base: Checkpoint) -> torch.dtype | None:
    """config ``dtype``, else the base's config.json dtype, else None (each tensor keeps its own)."""
    name = config.dtype or base.config().get("torch_dtype") or base.config().get("dtype")
    if name is not None and name not in DTYPES:
        raise CheckpointError(
            f"{base.path}/config.json: torch_dtype {name!r} is not a float dtype; set dtype: in the config"
        )
    return DTYPES[name] if name is not None else None


def _computed(
    config: MoEConfig,
    inputs: _Inputs,
    arch: OutputArchitecture,
    layers: int,
    staged: StagedOutput,
    seed: int,
    quiet: bool,
    max_memory: int | None,
) -> Checkpoint:
    """The checkpoint of what no input holds: per layer the router and the shared expert's gate, and
    for Qwen2-MoE from a base without attention biases, zero biases. Reused by a resumed build
    when it was computed for the same config and seed (its header records which)."""
    directory = staged.path(COMPUTED)
    weights = directory / "model.safetensors"
    fingerprint = config.fingerprint(seed)
    if not _holds(weights, fingerprint):
        base = inputs.checkpoints[0]
        gates = gate_vectors(config, base.path, base, seed, spill_dir=str(staged.staging),
                             progress=not quiet, max_memory=max_memory)
        degenerate = degenerate_layers(gates)
        if degenerate and not quiet:
            warnings.warn(f"the routers of layers {', '.join(map(str, degenerate))} are degenerate "
                          "(condition number above 5): the prompts may be too similar, and some "
                          "experts will be rarely used", PlanWarning, stacklevel=2)
        n = len(config.experts)
        tensors = {}
        for i in range(layers):
            tensors[_ROUTER.format(i)] = gates[i, :n].contiguous()
            if arch.shared_router is not None:
                tensors[_SHARED_ROUTER.format(i)] = gates[i, n:].contiguous()
        if arch.needs_attention_bias:
            tensors |= _zero_biases(base, layers)
        directory.mkdir(exist_ok=True)
        fresh = weights.with_suffix(".partial")  # renamed once whole: a kill leaves no torn file
        save_file(tensors, str(fresh), metadata={"moe_config": fingerprint})
        os.replace(fresh, weights)
    return Checkpoint(directory)


def _holds(weights: Path, fingerprint: str) -> bool:
    try:
        with safe_open(str(weights), "pt") as f:
            return (f.metadata() or {}).get("moe_config") == fingerprint
    except (OSError, SafetensorError):  # absent, or cut short by a kill: computed again
        return False


def _zero_biases(base: Checkpoint, layers: int) -> dict[str, torch.Tensor]:
    """Zero q/k/v biases (Qwen2-MoE's attention has them) for a base without, of the projections'
    widths (mergekit computes them from the head counts; the weights' rows are the same numbers)."""
    out = {}
    for i in range(layers):
        for p in ("q_proj", "k_proj", "v_proj"):
            weight = f"model.layers.{i}.self_attn.{p}.weight"
            if (
                f"model.layers.{i}.self_attn.{p}.bias" not in base.tensors
                and weight in base.tensors
            ):
                out[_BIAS.format(weight)] = torch.zeros(
                    base.tensors[weight].shape[0], dtype=base.tensors[weight].dtype
                )
    return out


def _schedule(
    plan: MergePlan,
    config: MoEConfig,
    inputs: _Inputs,
    arch: OutputArchitecture,
    checkpoints: tuple[Any, ...],
    layers: int,
    out_dtype: torch.dtype | None,
) -> Schedule:
    """The copies, layer by layer: the base's tensors of the layer, its router (and shared gate),
    then every expert's projections."""
    computed = len(checkpoints) - 1
    workers = 1  # copies: the engine's reader and writer threads do the work
    budget = working_budget(plan)
    by_layer: dict[int | None, list[TensorJob]] = {}

    def add(name: str, checkpoint: int, tensor: str, expert: tuple[int, Expert] | None = None) -> None:
        """Output ``name`` from ``tensor`` of ``checkpoints[checkpoint]``; an expert's weights get
        its noise (and its residual scale for down_proj), in the stored dtype as mergekit does."""
        stored = checkpoints[checkpoint].tensors[tensor]
        out = out_dtype if out_dtype is not None and stored.dtype.is_floating_point else stored.dtype
        noise = expert[1].noise_scale if expert else None
        residual = expert[1].residual_scale if expert and "down_proj" in tensor else None
        method, ids, params = None, (), TensorParams({}, ())
        if expert and (noise is not None or residual is not None):
            method, ids, params = EXPERT, (expert[0],), expert_params(noise, residual)
        job = TensorJob(name, tuple(stored.shape), method, (Source(checkpoint, tensor),), False, ids,
                        params, stored.dtype, stored.dtype, out)
        per_element = bytes_per_element(checkpoints, job, workers)
        job = replace(job, rows_per_chunk=chunk_rows(plan, job, per_element, budget, workers))
        layer = layer_index(name)
        by_layer.setdefault(-1 if layer is None and is_pre_layer(name) else layer, []).append(job)

    base = checkpoints[0]
    for name in base.tensors:
        if ".mlp." not in name and not name.endswith(_SKIPPED):
            add(name, 0, name)
    for tensor in checkpoints[computed].tensors:
        kind, _, rest = tensor.partition(".")
        if kind == "zero_bias":
            add(rest.removesuffix(".weight") + ".bias", computed, tensor)
    n = len(config.experts)
    for i in range(layers):
        add(arch.router(i), computed, _ROUTER.format(i))
        if arch.shared_router is not None:
            add(arch.shared_router(i), computed, _SHARED_ROUTER.format(i))
        for e, (c, expert) in enumerate(zip(inputs.experts, config.experts)):
            for proj in PROJECTIONS:
                add(arch.expert(i, e, proj), c, _mlp(i, proj), (e, expert))
        if arch.shared is not None:
            for s, (c, expert) in enumerate(zip(inputs.shared, config.shared_experts or [])):
                for proj in PROJECTIONS:
                    add(arch.shared(i, proj), c, _mlp(i, proj), (n + s, expert))
    order = sorted(by_layer, key=lambda k: (k is None, k if k is not None else 0))
    jobs = [j for k in order for j in by_layer[k]]
    return finish_schedule(
        plan, EXPERT, checkpoints, jobs, [], (), 0, [(None, layers)], None, CPU, None, workers
    )


def _run(
    sched: Schedule,
    staged: StagedOutput,
    config_file: str | Path,
    config: MoEConfig,
    arch: OutputArchitecture,
    out_dtype: torch.dtype | None,
    write_model_card: bool,
    quiet: bool,
    started: float,
) -> MergeResult:
    """Write the schedule (resuming a partial one), the model's files and the manifest, then commit."""
    from streammerge import __version__

    try:
        journal = Journal(staged.staging, sched)
    except OSError as e:
        raise OutputError(f"{e.filename or staged.staging}: cannot write ({e.strerror})") from None
    resumed = len(journal.entries)
    try:
        report, downloading, merging = merge_weights(sched, staged, quiet, journal)
        write_model_files(sched, staged, __version__)  # the index and the tokenizer files
        dtype = out_dtype or sched.jobs[0].out_dtype
        staged.write_json(
            "config.json",
            output_config(
                arch, sched.checkpoints[0].path, config, dtype, len(config.shared_experts or [])
            ),
        )
        if write_model_card:  # mergekit-moe's card: the config it was built from
            staged.write_text(
                "mergekit_moe_config.yml", Path(config_file).read_text(encoding="utf-8")
            )
        staged.write_json(MANIFEST, manifest(sched, journal.entries, journal.identity))
    except StreamMergeError as e:
        raise type(e)(
            f"{e} (the partial output is kept in {staged.staging}: the same command resumes it, "
            "--restart discards it)"
        ) from None
    finally:
        journal.close()
    discard_journals(staged.staging)
    shutil.rmtree(staged.path(COMPUTED))
    committed = time.perf_counter()
    staged.commit()
    notes = (
        f"output architecture: {arch.name}, {len(config.experts)} experts",
        *(
            (f"resumed: {resumed} of {len(sched.jobs)} tensors were already written",)
            if resumed
            else ()
        ),
    )
    return MergeResult(
        staged.destination,
        len(sched.jobs),
        len(sched.shards),
        sched.read_bytes,
        sched.write_bytes,
        time.perf_counter() - started,
        report.sync_seconds + time.perf_counter() - committed,
        (*notes, *report.notes),
        sched.device.description,
        inputs=tuple(str(c.path) for c in sched.checkpoints[:-1]),
        download_seconds=downloading,
        merge_seconds=merging,
    )
