"""Write the merged adapter as a PEFT adapter directory: ``adapter_config.json`` and
``adapter_model.safetensors``, its header written first and each module's factors pwritten as
they are computed, one module at a time.

The factors are stored with scaling 1 (``lora_alpha`` = ``r``, no ``use_rslora``), every module at
the same rank (lower-rank modules padded with zeros, which add nothing), in PEFT's layout: lora_B
[out, r] and lora_A [r, in] for linear layers, transposed for ``fan_in_fan_out`` layers, and
lora_embedding_A [r, vocab], lora_embedding_B [dim, r] for embeddings.
"""

from __future__ import annotations

import math

import torch

from streammerge.errors import PlanError
from streammerge.finalize import model_card
from streammerge.io.safetensors_format import build_header
from streammerge.io.writer import ShardWriter, StagedOutput
from streammerge.lora.adapter import CONFIG, WEIGHTS, LoraAdapter, LoraModule
from streammerge.lora.combine import combine
from streammerge.lora.overlay import AdaptedCheckpoint
from streammerge.schedule import DTYPES, Schedule, TensorJob

PREFIX = "base_model.model."  # PEFT's prefix of every tensor name
# Input config keys that would narrow or change what the written adapter means.
_RESET = {"rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "modules_to_save": None, "layers_to_transform": None,
          "layers_pattern": None, "exclude_modules": None, "revision": None}


def _adapters(schedule: Schedule, job: TensorJob) -> list[LoraAdapter]:
    """The adapter of each merged model of a job; every model must be base_model+adapter."""
    models = job.inputs[1:] if job.has_base else job.inputs
    base = schedule.checkpoints[job.inputs[0].checkpoint] if job.has_base else None
    out = []
    for k, src in enumerate(models):
        c = schedule.checkpoints[src.checkpoint]
        if not isinstance(c, AdaptedCheckpoint) or base is None or c.base is not base:
            raise PlanError(f"adapter_output: models[{k}] must be an adapter over base_model ('adapters:' or "
                            f"'model: base+adapter'), got {c.path}")
        out.append(c.adapter)
    return out


def peft_factors(module: str, left: torch.Tensor, right: torch.Tensor, embedding: bool = False,
                 fan_in_fan_out: bool = False) -> dict[str, torch.Tensor]:
    """Base-orientation factors of ``module`` (ΔW = left @ right) under PEFT's names and layout."""
    key = PREFIX + module
    if embedding:
        return {f"{key}.lora_embedding_A": left.T, f"{key}.lora_embedding_B": right.T}
    if fan_in_fan_out:
        return {f"{key}.lora_A.weight": left.T, f"{key}.lora_B.weight": right.T}
    return {f"{key}.lora_A.weight": right, f"{key}.lora_B.weight": left}


def _factor_tensors(lm: LoraModule, left: torch.Tensor, right: torch.Tensor) -> dict[str, torch.Tensor]:
    return peft_factors(lm.module, left, right, lm.embedding, lm.fan_in_fan_out)


def write_adapter(schedule: Schedule, staged: StagedOutput, version: str) -> None:
    plan, out = schedule.plan, schedule.plan.adapter_output
    assert out is not None
    if plan.models is None:
        raise PlanError("adapter_output: needs 'adapters:' or 'models:' (not 'slices:')")
    jobs = {j.name: j for j in schedule.jobs}
    adapters = _adapters(schedule, next(iter(jobs.values())))
    for a in adapters:
        if a.replaced:
            raise PlanError(f"adapter_output: {a.path} replaces whole tensors (modules_to_save, e.g. {next(iter(a.replaced))!r}), "
                            "which an adapter merge cannot combine; drop adapter_output to write a model")
        if a.biases:
            raise PlanError(f"adapter_output: {a.path} updates biases (lora_B.bias, e.g. "
                            f"{next(iter(a.biases))!r}), which an adapter merge does not combine; "
                            "drop adapter_output to write a model")
    if len({bool(a.config.get("fan_in_fan_out")) for a in adapters}) > 1:
        raise PlanError("adapter_output: the adapters disagree on fan_in_fan_out")
    # in schedule order; a module the plan's `select` leaves out is not in the merged adapter
    targets = sorted({t for a in adapters for t in a.modules if jobs[t].method is not None}, key=list(jobs).index)
    modules = {t: next(a.modules[t] for a in adapters if t in a.modules) for t in targets}
    if not targets:
        raise PlanError("adapter_output: the plan's select leaves no adapted module to merge")
    if out.combination == "cat":
        rank = max(sum(a.rank(t) for a in adapters if t in a.modules) for t in targets)
    else:
        rank = out.rank or max(a.rank(t) for a in adapters for t in a.modules)
    dtype = DTYPES[plan.out_dtype or plan.dtype or "float32"]
    shapes = {}
    for t in targets:
        rows, cols = jobs[t].shape
        shapes |= {k: tuple(v.shape) for k, v in _factor_tensors(modules[t], torch.empty(rows, rank), torch.empty(rank, cols)).items()}
    header, offsets = build_header([(k, dtype, s) for k, s in shapes.items()], {"format": "pt"})
    writer = ShardWriter(staged.path(WEIGHTS), header, len(header) + sum(math.prod(s) * dtype.itemsize for s in shapes.values()))
    try:
        for t in targets:
            job = jobs[t]
            factors = [a.factors(t) if t in a.modules else None for a in adapters]
            left, right = combine(job.method, out.combination, rank, out.clamp, t, job.params, factors, job.shape, plan.seed, job.model_ids)
            for key, tensor in _factor_tensors(modules[t], left, right).items():
                writer.write(offsets[key], tensor.to(dtype))
    finally:
        writer.close()
    config = {**adapters[0].config, **_RESET, "r": rank, "lora_alpha": rank, "target_modules": [modules[t].module for t in targets],
              "base_model_name_or_path": adapters[0].config.get("base_model_name_or_path") or plan.base_model}
    staged.write_json(CONFIG, config)
    staged.write_text("README.md", model_card(schedule, version))
