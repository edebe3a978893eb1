"""Run a LoRA extraction out of core: one module's difference in memory at a time, resumable.

Each factored module is read from both models, opened as a merge opens its inputs (a directory,
``org/name[@revision]`` on the Hub, or ``model+adapter`` with the adapter folded in as it is read;
``Checkpoint``: one tensor by positioned reads),
its difference factored (``streammerge.lora.extract``) and its factors written to
``parts/<module>.safetensors`` in the staging directory beside the output (``StagedOutput``):
written whole, fsynced, then renamed into place, so a part that exists is complete and a killed
run goes on at the first module without one. ``extract-lora.json`` there holds the run's identity
(streammerge version, options, every input file's size and header sha256), and a staging directory
of another run is refused rather than mixed in (``--restart`` discards it).

When every module is factored, ``adapter_model.safetensors`` is assembled with its header first
(``build_header``, ``ShardWriter``): the parts' factors, then the tensors saved whole, copied from
the fine-tune in row chunks. ``adapter_config.json`` and ``README.md`` follow and the staging
directory becomes the output in one rename.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from streammerge.device import resolve_device
from streammerge.errors import CheckpointError, OutputError, PlanError
from streammerge.io.hub import is_hub_reference
from streammerge.io.reader import Checkpoint, ShardReader
from streammerge.io.safetensors_format import build_header
from streammerge.io.writer import ShardWriter, StagedOutput, fsync_dir, lock_staging
from streammerge.lora.adapter import CONFIG, WEIGHTS
from streammerge.lora.extract import ExtractOptions, Extraction, ModuleTask, factor_rows, plan_extraction
from streammerge.lora.output import PREFIX, peft_factors
from streammerge.lora.overlay import AdaptedCheckpoint, open_checkpoints
from streammerge.lora.reference import split_reference
from streammerge.plan.architecture import TIED_HEADS, is_pre_layer, is_vocab_tensor, tied_partner

IDENTITY = "extract-lora.json"
Input = Checkpoint | AdaptedCheckpoint
PARTS = "parts"
_COPY_BYTES = 64 << 20  # rows of a whole tensor copied to the output at a time


@dataclass(frozen=True)
class ExtractResult:
    output: Path
    factored: int  # modules written as LoRA factors
    saved: int  # modules saved whole (modules_to_save)
    rank: int  # the adapter's r: the largest module rank
    resumed: int  # modules a killed run had factored already
    seconds: float
    errors: dict[str, float]  # per factored module, ‖ΔW − B·A‖_F = √(Σ_{i>r} σ_i²)
    notes: tuple[str, ...]


def extract_lora(model: str | Path, base_model: str | Path, out_path: str | Path,
                 options: ExtractOptions = ExtractOptions(), *, overwrite: bool = False,
                 restart: bool = False, quiet: bool = False, device: str = "cpu",
                 cache_dir: str | None = None) -> ExtractResult:
    """Factor ``model`` − ``base_model`` into a PEFT LoRA adapter written to ``out_path``, as
    mergekit-extract-lora does (see ``streammerge.lora.extract``). A killed or failed run leaves
    its progress beside ``out_path``; the same call resumes it, ``restart`` discards it.
    ``cache_dir``: where models named ``org/name[@revision]`` are fetched from the Hub."""
    if options.max_rank < 1:
        raise PlanError(f"--max-rank {options.max_rank}: the rank must be at least 1")
    started = time.perf_counter()
    destination = Path(out_path).expanduser().absolute()
    refs = [_resolve("--model", str(model), cache_dir), _resolve("--base-model", str(base_model), cache_dir)]
    ft, base = open_checkpoints(refs)
    try:
        run = _Run(ft, base, str(base_model), destination, options, resolve_device(device).torch)
        return run.execute(overwrite, restart, quiet, started)
    finally:
        ft.close()
        base.close()  # a base shared with ``ft`` (``--model BASE+ADAPTER``) closes once


def _resolve(flag: str, ref: str, cache_dir: str | None) -> str:
    """A model reference as a plan takes it, as local directories (``dir`` or ``dir+adapter``)."""
    from streammerge.plan.load import resolve_model  # the plan package imports the lora package

    if split_reference(ref)[1] is None and not Path(ref).expanduser().is_dir() and not is_hub_reference(ref):
        raise CheckpointError(f"{flag} {ref}: model directory not found (give a directory, "
                              "org/name[@revision] on the Hugging Face Hub, or MODEL+ADAPTER)")
    return resolve_model(ref, cache_dir)


def _check_output_place(destination: Path, inputs: list[Path]) -> None:
    where = destination.resolve()
    for model in (p.resolve() for p in inputs):
        if where == model or model in where.parents or where in model.parents:
            raise OutputError(f"{destination}: the output may not be, hold or lie in an input model "
                              f"directory ({model}); choose another --out-path")


def _vocab_rows(tensors: dict) -> int | None:
    name = next((n for n in tensors if is_pre_layer(n) and is_vocab_tensor(n)), None)
    return None if name is None else tensors[name].shape[0]


class _TiedHead:
    """A checkpoint whose omitted tied output head reads as the embedding it is tied to, as
    mergekit reads it (its architectures' ``tied_names``): the head is saved or factored too, so
    PEFT, which gives a model's tied head no update of the embedding's, gets it explicitly."""

    def __init__(self, checkpoint: Input, alias: dict[str, str]):
        self._checkpoint, self._alias = checkpoint, alias
        self.path = checkpoint.path
        self.tensors = {**checkpoint.tensors, **{h: checkpoint.tensors[e] for h, e in alias.items()}}

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        return self._checkpoint.read(self._alias.get(name, name), rows)

    def release(self, name: str) -> None:
        self._checkpoint.release(self._alias.get(name, name))

    def fingerprint(self) -> dict[str, tuple[int, str]]:
        return self._checkpoint.fingerprint()


class _Run:
    def __init__(self, ft: Input, base: Input, base_ref: str, destination: Path,
                 options: ExtractOptions, device: torch.device):
        alias = {h: e for h in TIED_HEADS if h not in ft.tensors and h not in base.tensors
                 and (e := tied_partner(h, ft.tensors)) is not None and e in base.tensors}
        self.ft, self.base, self.base_ref = _TiedHead(ft, alias), _TiedHead(base, alias), base_ref
        self.destination, self.options, self.device = destination, options, device
        _check_output_place(destination, [ft.path, base.path])
        self.notes: list[str] = []
        embed_lora = options.embed_lora
        ft_vocab, base_vocab = _vocab_rows(ft.tensors), _vocab_rows(base.tensors)
        if embed_lora and ft_vocab != base_vocab:
            self.notes.append(f"the vocabularies differ ({ft_vocab} tokens in {ft.path}, {base_vocab} in "
                              f"{base.path}): embeddings are saved whole (modules_to_save), not as LoRA")
            embed_lora = False
        self.embed_lora = embed_lora
        self.plan: Extraction = plan_extraction(self.ft.tensors, options, embed_lora)
        self.factored = [t for t in self.plan.tasks if t.kind != "save"]
        if not self.factored:
            raise PlanError("no module is left to factor: the regexes (-i/-e) and --save-module leave "
                            "out every matrix of the model; relax them")
        for t in self.factored:
            self._check_base(t)
        if self.plan.skipped:
            self.notes.append(f"{len(self.plan.skipped)} undecomposable module(s) skipped "
                              f"(--skip-undecomposable), e.g. {self.plan.skipped[0]}")
        if self.plan.ignored:
            self.notes.append(f"{len(self.plan.ignored)} tensor(s) that are no module's weight or bias "
                              f"left out, e.g. {self.plan.ignored[0]}")

    def _check_base(self, task: ModuleTask) -> None:
        for name in task.tensors:
            have, want = self.base.tensors.get(name), self.ft.tensors[name]
            if have is None:
                raise CheckpointError(f"{self.base.path}: has no tensor {name!r}, which {self.ft.path} has: "
                                      "--base-model must be the model the fine-tune was trained from")
            if tuple(have.shape) != tuple(want.shape):
                raise CheckpointError(f"tensor {name!r} is {list(want.shape)} in {self.ft.path} but "
                                      f"{list(have.shape)} in {self.base.path}: --base-model must be the "
                                      "model the fine-tune was trained from (the same architecture and "
                                      "sizes)")

    def identity(self) -> dict:
        """What must not change for a partial extraction to be resumed."""
        from streammerge import __version__

        ident = {"streammerge": __version__, "options": asdict(self.options), "device": self.device.type,
                 "inputs": [[str(c.path), c.fingerprint()] for c in (self.ft, self.base)]}
        return json.loads(json.dumps(ident))  # tuples as lists, as read back from the file

    def execute(self, overwrite: bool, restart: bool, quiet: bool, started: float) -> ExtractResult:
        staged = StagedOutput(self.destination, overwrite, restart)
        lock = lock_staging(staged.staging)
        try:
            self._claim(staged)
            ranks, errors, resumed = self._factor_all(staged, quiet)
            if not any(ranks.values()):
                shutil.rmtree(staged.staging)  # a rerun with these options ends here again: nothing to keep
                raise PlanError(f"every module's singular values are at most --sv-epsilon "
                                f"{self.options.sv_epsilon}: the fine-tune differs too little from its base "
                                "for an adapter; lower it")
            zero = [m for m, r in ranks.items() if r == 0]
            if zero:
                self.notes.append(f"{len(zero)} module(s) left out: no singular value above --sv-epsilon "
                                  f"(e.g. {zero[0]})")
            biases = self._assemble(staged, ranks)
            staged.write_json(CONFIG, self._config(ranks, biases))
            staged.write_text("README.md", self._card(ranks))
            shutil.rmtree(staged.path(PARTS))
            staged.remove(IDENTITY)  # a staging directory without an identity is never resumed
        except OSError as e:
            raise OutputError(f"{e.filename or staged.staging}: cannot write ({e.strerror}); the partial "
                              f"output is kept in {staged.staging}: the same command resumes it") from None
        finally:
            os.close(lock)
        staged.commit()
        if resumed:
            self.notes.append(f"resumed: {resumed} of {len(self.factored)} modules were already factored")
        saved = sum(t.kind == "save" for t in self.plan.tasks)
        return ExtractResult(self.destination, sum(r > 0 for r in ranks.values()), saved, max(ranks.values()),
                             resumed, time.perf_counter() - started, errors, tuple(self.notes))

    def _claim(self, staged: StagedOutput) -> None:
        """Record this run's identity in the staging directory, or check that it is the one there."""
        ident, path = self.identity(), staged.path(IDENTITY)
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError:
                old = None  # cut short by a kill before any part was written
            if old is not None and old != ident:
                raise OutputError(f"{staged.staging}: holds a partial extraction with other inputs, options "
                                  "or streammerge version; run with --restart to discard it, or give another "
                                  "--out-path")
            if old is not None:
                return
        shutil.rmtree(staged.path(PARTS), ignore_errors=True)  # parts without an identity are not trusted
        staged.write_json(IDENTITY, ident)
        fsync_dir(staged.staging)

    def _factor_all(self, staged: StagedOutput, quiet: bool) -> tuple[dict[str, int], dict[str, float], int]:
        parts = staged.path(PARTS)
        parts.mkdir(exist_ok=True)
        ranks, errors, resumed = {}, {}, 0
        with tqdm(total=len(self.factored), desc="extract-lora", unit="module", disable=quiet) as bar:
            for task in self.factored:
                part = parts / f"{task.module}.safetensors"
                if part.is_file():
                    resumed += 1
                else:
                    self._factor_module(task, part)
                reader = ShardReader(part)
                ranks[task.module] = int(reader.metadata["rank"])
                errors[task.module] = float(reader.metadata["error"])
                reader.close()
                bar.update()
        return ranks, errors, resumed

    def _difference(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """FT − BASE of one tensor (or rows of it) in float32: with compute_dtype ``auto`` taken in
        the inputs' dtype first, as mergekit takes it (bf16 inputs: ΔW rounded to bf16), else
        exactly. NaN or Inf is refused, naming the tensor: an SVD cannot take it."""
        ft, base = self.ft.read(name, rows), self.base.read(name, rows)
        if self.options.compute_dtype == "auto":
            delta = (ft - base).to(torch.float32)
        else:
            delta = ft.to(torch.float32)
            delta -= base.to(torch.float32)
        if not bool(delta.sum().isfinite()) and not bool(torch.isfinite(delta).all()):
            raise CheckpointError(f"tensor {name!r} holds NaN or Inf in {self.ft.path} or "
                                  f"{self.base.path}: its difference cannot be factored; fix the input")
        return delta

    def _factor_module(self, task: ModuleTask, part: Path) -> None:
        """Factor one module and write its part: PEFT-named factors (and bias difference)."""
        embedding = task.kind == "embedding"
        shape = tuple(self.ft.tensors[task.weight].shape)
        f = factor_rows(lambda start, stop: self._difference(task.weight, slice(start, stop)), shape,
                        self.options.max_rank, self.options.sv_epsilon, self.options.distribute_scale,
                        transpose=embedding, device=self.device)
        self.ft.release(task.weight)
        self.base.release(task.weight)
        dtype = torch.promote_types(self.ft.tensors[task.weight].dtype, self.base.tensors[task.weight].dtype)
        a, b = f.a.cpu(), f.b.cpu()
        tensors: dict[str, torch.Tensor] = {}
        if f.rank:
            # base orientation ΔW = left @ right: B·A for a linear layer, (B·A)ᵀ for an embedding
            left, right = (a.T, b.T) if embedding else (b, a)
            tensors = peft_factors(task.module, left, right, embedding)
            if task.bias is not None:
                tensors[f"{PREFIX}{task.module}.lora_B.bias"] = self._difference(task.bias)
        tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
        meta = {"format": "pt", "rank": str(f.rank), "error": repr(f.truncation_error())}
        _write_whole(part, tensors, meta)

    def _assemble(self, staged: StagedOutput, ranks: dict[str, int]) -> bool:
        """Write adapter_model.safetensors from the parts and the whole tensors; whether it holds
        bias differences."""
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        # output name -> (its part file, or None for the fine-tune; the tensor's name there)
        sources: dict[str, tuple[Path | None, str]] = {}
        for task in self.plan.tasks:
            if task.kind == "save":
                for name in task.tensors:
                    info = self.ft.tensors[name]
                    layout.append((PREFIX + name, info.dtype, tuple(info.shape)))
                    sources[PREFIX + name] = (None, name)
            elif ranks[task.module]:
                part = staged.path(PARTS) / f"{task.module}.safetensors"
                reader = ShardReader(part)
                for key, e in reader.entries.items():
                    layout.append((key, e.dtype, tuple(e.shape)))
                    sources[key] = (part, key)
                reader.close()
        header, offsets = build_header(layout, {"format": "pt"})
        size = len(header) + sum(math.prod(s) * d.itemsize for _, d, s in layout)
        writer = ShardWriter(staged.path(WEIGHTS), header, size)
        try:
            for key, (part, name) in sources.items():
                if part is not None:
                    reader = ShardReader(part)
                    writer.write(offsets[key], reader.read(name))
                    reader.close()
                else:
                    self._copy_whole(writer, offsets[key], name)
        finally:
            writer.close()
        return any(k.endswith(".lora_B.bias") for k in sources)

    def _copy_whole(self, writer: ShardWriter, offset: int, name: str) -> None:
        """Copy a fine-tune tensor in row chunks of at most ``_COPY_BYTES``."""
        info = self.ft.tensors[name]
        if len(info.shape) < 2:
            writer.write(offset, self.ft.read(name))
            return
        row = math.prod(info.shape[1:]) * info.dtype.itemsize
        step = max(1, _COPY_BYTES // max(row, 1))
        for start in range(0, info.shape[0], step):
            stop = min(start + step, info.shape[0])
            writer.write(offset + start * row, self.ft.read(name, slice(start, stop)))
        self.ft.release(name)

    def _targets(self, ranks: dict[str, int]) -> list[str]:
        """target_modules: a module's last name component where every matrix of the model with it
        is factored (mergekit lists only those), else the modules' full names, so PEFT adds no
        LoRA layer to a module saved whole or left out."""
        kept = {m for m, r in ranks.items() if r}
        by_key: dict[str, list[str]] = {}
        for name, info in self.ft.tensors.items():
            if name.endswith(".weight") and len(info.shape) == 2:
                module = name.removesuffix(".weight")
                by_key.setdefault(module.rpartition(".")[2], []).append(module)
        out: list[str] = []
        for key, modules in sorted(by_key.items()):
            if all(m in kept for m in modules):
                out.append(key)
            else:
                out += [m for m in modules if m in kept]
        return out

    def _config(self, ranks: dict[str, int], biases: bool) -> dict:
        r = max(ranks.values())
        different = {m: k for m, k in ranks.items() if k and k != r}
        config = {
            "base_model_name_or_path": self.base_ref, "peft_type": "LORA", "use_rslora": False,
            "target_modules": self._targets(ranks), "modules_to_save": self.plan.modules_to_save,
            "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "rank_pattern": different,
            "alpha_pattern": different, "lora_dropout": 0.0, "fan_in_fan_out": False, "inference_mode": True,
        }
        if biases:  # as mergekit writes them: PEFT's lora_bias would make merge_and_unload fail
            self.notes.append("bias differences are written as lora_B.bias, as mergekit does, without "
                              "PEFT's lora_bias (under which merge_and_unload fails on modules without a "
                              "bias): PEFT ignores them; streammerge's fold (model: BASE+ADAPTER) adds them")
        return config

    def _card(self, ranks: dict[str, int]) -> str:
        from streammerge import __version__

        return (f"---\nbase_model: {json.dumps(self.base_ref)}\nlibrary_name: peft\n"
                "tags: [lora, streammerge]\n---\n\n"
                f"# LoRA extracted from {self.ft.path.name}\n\n"
                f"Extracted with streammerge {__version__} `extract-lora` (mergekit-extract-lora's method): "
                f"the truncated SVD of each module's difference between `{self.ft.path}` and "
                f"`{self.base.path}`, "
                f"rank at most {self.options.max_rank} (r = {max(ranks.values())}); "
                f"{len(self.plan.modules_to_save)} module name(s) saved whole: "
                f"{', '.join(self.plan.modules_to_save) or 'none'}.\n")


def _write_whole(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file that appears complete or not at all: written, fsynced, then renamed."""
    header, offsets = build_header([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a killed run's: rewritten from the start
    size = len(header) + sum(v.numel() * v.element_size() for v in tensors.values())
    writer = ShardWriter(tmp, header, size)
    try:
        for key, tensor in tensors.items():
            writer.write(offsets[key], tensor)
    finally:
        writer.close()
    os.rename(tmp, path)
    fsync_dir(path.parent)
