"""mergekit-yaml's and mergekit-multi's command lines (mergekit 0.1.5), translated for streammerge.

Every option of mergekit's ``MergeOptions`` is accepted under its own spelling, ``--no-`` forms
included, so a command copied from a model card runs. Each one becomes what it means here (a plan
override, the thread count) or, where streammerge has nothing to do for it (it already streams,
never runs checkpoint code, writes safetensors only), one note that says so. Options left out are
not passed on, so the plan's own keys and streammerge's defaults apply.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from streammerge.api import Stage, with_stage_outputs
from streammerge.errors import PlanError

HEADING = "mergekit-yaml options (mergekit 0.1.5's spelling)"


def parse_kmb(value: str) -> int:
    """A count as mergekit writes it: digits, optionally with k, m or b for 10^3, 10^6, 10^9."""
    text = value.strip()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit():
        raise ValueError(f"{value!r} is not a count (digits, optionally with K, M or B: 5B, 500M)")
    return int(digits) * scale


class _Kmb(click.ParamType):
    name = "COUNT"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return value if isinstance(value, int) else parse_kmb(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _flag(name: str, help: str) -> Callable:
    return click.option(f"--{name}/--no-{name}", default=None, help=help)


# What each option means here; the defaults in brackets are mergekit's (and streammerge's).
DEVICE_OPTION = click.option(
    "--device", metavar="DEVICE",
    help="Where the merge kernels run: cpu (default), cuda (or cuda:0; an error without a GPU), or auto "
         "(CUDA when present, else the CPU, as the summary says).")
QUIET_OPTION = click.option("-q", "--quiet/--no-quiet", default=False,
                            help="No progress bar, notes or summary.")
OPTIONS = [
    _flag("allow-crimes",
          "Merge inputs of different architectures (config.json 'architectures'); refused without it."),
    _flag("unsafe-truncate-embeddings", "Cut embedding and lm_head rows to the smallest input's vocabulary "
                                        "(plan key vocab_policy: truncate); drops the rows of added tokens."),
    click.option("--transformers-cache", type=click.Path(file_okay=False),
                 help="Cache for models named org/name on the Hub (as --cache-dir)."),
    click.option("--lora-merge-cache", type=click.Path(file_okay=False),
                 help="Accepted; unused: adapters are folded in as they are read, no merged copy is stored."),
    click.option("--lora-merge-dtype",
                 help="Accepted; unused: an adapter's update is added in float32 as it is read."),
    _flag("cuda", "Run the merge kernels on CUDA (as --device cuda)."),
    _flag("low-cpu-memory", "Accepted; streammerge keeps a few chunks in memory (see --max-memory)."),
    click.option("--out-shard-size", type=_Kmb(),
                 help="Largest output shard in bytes, in mergekit's count syntax: 5B = 5*10^9 bytes [5B]; "
                      "0: one shard."),
    _flag("copy-tokenizer", "Copy the donor's tokenizer files when the plan builds no tokenizer [on]."),
    _flag("clone-tensors", "Accepted; every output tensor is written from its own buffer already."),
    _flag("trust-remote-code", "Accepted; streammerge never runs code from a checkpoint."),
    click.option("--random-seed", type=int, help="Seed for random methods (as --seed)."),
    _flag("lazy-unpickle", "Accepted; every tensor is read lazily already."),
    _flag("write-model-card", "Write README.md describing the merge [on]."),
    _flag("safe-serialization",
          "Write safetensors [on]; --no-safe-serialization is refused (safetensors only)."),
    click.option("-v", "--verbose", "verbosity", count=True,
                 help="Accepted; streammerge has one level of output."),
    _flag("read-to-gpu", "Accepted; with --device cuda each chunk moves to the GPU as it is merged."),
    _flag("multi-gpu", "Accepted; streammerge merges on one device."),
    click.option("-j", "--num-threads", type=click.IntRange(min=1),
                 help="CPU threads for the merge (as --threads)."),
    click.option("--gpu-rich", is_flag=True, default=None,
                 help="As --cuda (the rest is what streammerge does anyway)."),
    _flag("async-write", "Accepted; writes run in a thread of their own already."),
    click.option("--write-threads", type=click.IntRange(min=1),
                 help="Accepted; one writer thread runs behind the merge."),
]
NAMES = frozenset((
    "allow_crimes", "unsafe_truncate_embeddings", "transformers_cache", "lora_merge_cache",
    "lora_merge_dtype",
    "cuda", "low_cpu_memory", "out_shard_size", "copy_tokenizer", "clone_tensors", "trust_remote_code",
    "random_seed", "lazy_unpickle", "write_model_card", "safe_serialization", "verbosity", "read_to_gpu",
    "multi_gpu", "num_threads", "gpu_rich", "async_write", "write_threads"))

# Options that streammerge already does, and the note each one gets when it is asked for.
_ALREADY = {
    "low_cpu_memory": "--low-cpu-memory: streammerge keeps only a few chunks in memory (bounded by "
                      "--max-memory); nothing needs to move to the accelerator",
    "lazy_unpickle": "--lazy-unpickle: streammerge already reads every tensor lazily (safetensors by offset, "
                     ".bin files memory-mapped)",
    "read_to_gpu": "--read-to-gpu: streammerge reads into host buffers and, on CUDA, moves each chunk to the "
                   "GPU as it merges it",
    "multi_gpu": "--multi-gpu: streammerge merges one chunk at a time on one device; a second GPU would idle",
    "async_write": "--async-write: streammerge already writes in a thread of its own, "
                   "behind the merge",
    "write_threads": "--write-threads: streammerge writes with one thread behind the merge; "
                     "the disk, not the thread count, bounds it",

    "clone_tensors": "--clone-tensors: streammerge writes every output tensor from its own buffer; repeated "
                     "layers need no clone",
    "trust_remote_code": "--trust-remote-code: streammerge reads config.json and tensors only and never runs "
                         "code from a checkpoint; there is nothing to trust",
    "lora_merge_cache": "--lora-merge-cache: streammerge folds LoRA adapters into their base as it reads it "
                        "and stores no merged copy; nothing is cached",
    "lora_merge_dtype": "--lora-merge-dtype: streammerge adds an adapter's update to the base in "
                        "float32 as it reads it (no merged copy is written in any dtype); "
                        "the option has no effect",

    "verbosity": "-v: streammerge has one level of output (notes and a summary; --quiet silences them)",
    "gpu_rich": "--gpu-rich: taken as --cuda; streammerge already streams (see --low-cpu-memory, "
                "--read-to-gpu, --multi-gpu)",
}
# mergekit's option -> streammerge's plan key (or "threads"), and the native option it duplicates.
_MAPPED = {"random_seed": ("seed", "--seed", "--random-seed"),
           "out_shard_size": ("shard_size", "--shard-size", "--out-shard-size"),
           "transformers_cache": ("cache_dir", "--cache-dir", "--transformers-cache"),
           "num_threads": ("threads", "--threads", "-j/--num-threads")}


@dataclass
class Translation:
    overrides: dict[str, Any] = field(default_factory=dict)  # native plan keys for merge(...)
    threads: int | None = None
    notes: list[str] = field(default_factory=list)


def _device(value: str) -> str:
    if value in ("cpu", "cuda", "auto"):
        return value
    if value == "cuda:0":
        return "cuda"
    if value.startswith("cuda:"):
        raise PlanError(f"--device {value}: streammerge runs on the current CUDA device; select it with "
                        f"CUDA_VISIBLE_DEVICES={value[5:]} and --device cuda")
    raise PlanError(f"--device {value}: streammerge runs its kernels on cpu or cuda; "
                    "use --device cpu, cuda or auto")


def translate(given: dict[str, Any], native: dict[str, Any]) -> Translation:
    """``native`` (streammerge's own options, ``threads`` included) combined with ``given`` (the
    mergekit options, None where not given; ``device`` counts as one). Raises ``PlanError`` for
    what streammerge cannot do and for a value given twice under both spellings."""
    if given.get("safe_serialization") is False:
        raise PlanError("--no-safe-serialization: streammerge writes safetensors only "
                        "(no pickled .bin output); drop the option")
    out = Translation({k: v for k, v in native.items() if k != "threads" and v is not None},
                      native.get("threads"))
    for option, (key, native_flag, flag) in _MAPPED.items():
        value = given.get(option)
        if value is None:
            continue
        if option == "out_shard_size" and value == 0:
            value = sys.maxsize  # mergekit: no limit, one shard
        mine = out.threads if key == "threads" else out.overrides.get(key)
        if mine is not None and mine != value:
            raise PlanError(f"{native_flag} {mine} and {flag} {value} disagree; give one of them")
        if key == "threads":
            out.threads = value
        else:
            out.overrides[key] = value
    device = given.get("device")
    if device is not None:
        out.overrides["device"] = _device(device)
    elif given.get("cuda") or given.get("gpu_rich"):  # as in mergekit, an explicit --device wins over --cuda
        out.overrides["device"] = "cuda"
    for option in ("allow_crimes", "copy_tokenizer", "write_model_card"):
        if given.get(option) is not None:
            out.overrides[option] = given[option]
    if given.get("unsafe_truncate_embeddings"):
        out.overrides["vocab_policy"] = "truncate"
    out.notes = [note for option, note in _ALREADY.items() if given.get(option) not in (None, False, 0)]
    return out


def multi_stages(path: Path, documents: list[Any], out_path: Path | None, intermediate: Path,
                 lazy: bool) -> list[Stage]:
    """mergekit-multi's reading of a multi-document file: a document with a ``name:`` is written to
    ``intermediate/<name>``, the one without (at most one) to ``out_path``; a document runs after
    those whose names it uses as models. ``lazy``: an output that already holds a model is kept."""
    docs: dict[str | None, tuple[int, dict]] = {}
    for k, doc in enumerate(documents, 1):
        where = f"{path} (document {k})"
        if not isinstance(doc, dict):
            raise PlanError(f"{where}: a plan is a YAML mapping with at least 'merge_method' and 'models' "
                            "or 'slices'")
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is not None and not isinstance(name, str):
            raise PlanError(f"{where}: name: got {name!r}, expected a string")
        if name in docs:
            twice = f"name {name!r} is used by documents {docs[name][0]} and {k}" if name else \
                f"documents {docs[None][0]} and {k} have no 'name:' (one final merge at most)"
            raise PlanError(f"{path}: {twice}; give each document its own name")
        docs[name] = (k, doc)
    if None in docs and out_path is None:
        raise PlanError(f"{path}: document {docs[None][0]} has no 'name:', so it is the final merge: "
                        "give --out-path for it")
    outputs = {name: intermediate / name for name in docs if name is not None}
    outputs[None] = out_path
    named = [n for n in outputs if n is not None]
    # a document uses a name where putting that name's output directory in its place changes it
    uses = {name: [n for n in named if with_stage_outputs(doc, {n: str(outputs[n])}) != doc]
            for name, (_, doc) in docs.items()}
    order: list[str | None] = []

    def visit(name: str | None, chain: tuple[str | None, ...]) -> None:
        if name in chain:
            cycle = " -> ".join(str(n) for n in chain[chain.index(name):] + (name,))
            raise PlanError(f"{path}: the documents use each other's outputs ({cycle}); "
                            "remove the circular reference")
        if name not in order:
            for used in uses[name]:
                visit(used, chain + (name,))
            order.append(name)

    for name in docs:
        visit(name, ())
    return [Stage(docs[n][0], docs[n][1], n, outputs[n].absolute(), reuse=lazy) for n in order]


class MergekitHelp(click.Command):
    """``--help`` lists mergekit's options in a section of their own, after streammerge's."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own, theirs = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                (theirs if param.name in NAMES else own).append(record)
        for title, records in (("Options", own), (HEADING, theirs)):
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)
