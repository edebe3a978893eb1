"""The two-model command line of notebook-era merge scripts (``--model-a A --model-b B --alpha 0.7
[--layers 1 2 20] [--qkv-only] [--no-special-fixes]``), translated into a native ``linear`` plan.

merged = α·A + (1 − α)·B: weights α and 1 − α, ``normalize: false``. ``--layers`` becomes
``select.layers`` and ``--qkv-only`` ``select.modules: [qkv]`` (the fused projection where the
architecture has one); what is not selected is A's, as ``select`` copies from the first model.
Unless ``--no-special-fixes``, ``select.keep_tokens_from_base: special`` keeps A's rows of the
tokenizer's special tokens in merged embeddings and heads. Everything is checked from the
headers and configs before the plan is built, one line per problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from streammerge.errors import PlanError
from streammerge.io.hub import is_hub_reference
from streammerge.io.reader import Checkpoint
from streammerge.plan.architecture import MODULE_KINDS, layer_index
from streammerge.plan.load import resolve_model
from streammerge.tokenizer.vocab import TOKENIZER_JSON

DEFAULT_ROOT = Path("merged_models")


@dataclass(frozen=True)
class Architecture:
    """What both models are, from their configs and headers."""

    family: str  # config.json model_type
    name: str  # config.json architectures[0]
    layers: int
    qkv: tuple[str, ...]  # tensor-name fragments of the q/k/v projections; () when the family is not known
    fused: bool  # one qkv projection instead of q, k and v

    def describe(self) -> str:
        if not self.qkv:
            projections = "q/k/v projections not known for this family"
        else:
            kind = "fused q/k/v projection" if self.fused else "separate q/k/v projections"
            projections = f"{kind} ({', '.join(f.rsplit('.', 1)[-1] for f in self.qkv)})"
        return f"architecture: {self.family} ({self.name}), {self.layers} layers, {projections}"


def model_name(ref: str) -> str:
    """The directory's or Hub repository's basename, for the default output directory."""
    if is_hub_reference(ref) and not Path(ref).expanduser().is_dir():
        return ref.partition("@")[0].rsplit("/", 1)[-1]
    return Path(ref).expanduser().resolve().name


def default_output(model_a: str, model_b: str, alpha: float, layers: list[int] | None,
                   qkv_only: bool) -> Path:
    """``merged_models/<A>_<B>_alpha0.70[_layers1-2-20][_qkv]``."""
    name = f"{model_name(model_a)}_{model_name(model_b)}_alpha{alpha:.2f}"
    if layers:
        name += "_layers" + "-".join(map(str, layers))
    return DEFAULT_ROOT / (name + ("_qkv" if qkv_only else ""))


def check_request(alpha: float, layers: list[int] | None, qkv_only: bool) -> None:
    """The options' own constraints, before any model is opened."""
    if not 0.0 <= alpha <= 1.0:
        raise PlanError(f"--alpha {alpha}: must be between 0 and 1 (merged = alpha·A + (1 − alpha)·B)")
    if qkv_only and not layers:
        raise PlanError("--qkv-only needs --layers: name the decoder layers whose q/k/v projections "
                        "to merge, e.g. --layers 1 2 20")


def detect(a: Checkpoint, b: Checkpoint) -> Architecture:
    """Both models' architecture, refused in one line where they differ in architecture, tensor
    names or shapes."""
    config_a, config_b = a.config(), b.config()
    name_a = (config_a.get("architectures") or ["?"])[0]
    name_b = (config_b.get("architectures") or ["?"])[0]
    if (name_a, config_a.get("model_type")) != (name_b, config_b.get("model_type")):
        raise PlanError(f"--model-a {a.path} is {name_a} ({config_a.get('model_type')}), --model-b {b.path} "
                        f"is {name_b} ({config_b.get('model_type')}): linear merges two models of one "
                        "architecture")
    for name in sorted(set(a.tensors) | set(b.tensors)):
        if name not in b.tensors or name not in a.tensors:
            has, lacks = (a, b) if name in a.tensors else (b, a)
            raise PlanError(f"tensor {name!r} is in {has.path} but not in {lacks.path}: the models' "
                            "layouts differ")
        if a.tensors[name].shape != b.tensors[name].shape:
            raise PlanError(f"tensor {name!r} has shape {list(a.tensors[name].shape)} in {a.path} and "
                            f"{list(b.tensors[name].shape)} in {b.path}: the models' shapes differ")
    family = str(config_a.get("model_type"))
    layers = 1 + max((i for t in a.tensors if (i := layer_index(t)) is not None), default=-1)
    kinds = MODULE_KINDS.get(family, {})
    return Architecture(family, name_a, layers, kinds.get("qkv", ()), bool(kinds) and "q" not in kinds)


def check_layers(arch: Architecture, layers: list[int] | None, qkv_only: bool) -> None:
    bad = [li for li in layers or [] if not 0 <= li < arch.layers]
    if bad:
        raise PlanError(f"model has {arch.layers} layers (0-{arch.layers - 1}), got {bad[0]}")
    if qkv_only and not arch.qkv:
        raise PlanError(f"--qkv-only: the q/k/v projections of {arch.family!r} are not known (known "
                        f"families: {', '.join(sorted(MODULE_KINDS))}); merge whole layers without "
                        "--qkv-only")


def linear_plan(model_a: str, model_b: str, alpha: float, layers: list[int] | None, qkv_only: bool,
                keep_special: bool, device: str) -> dict[str, Any]:
    """The native plan the command line stands for."""
    select: dict[str, Any] = {}
    if layers:
        select["layers"] = layers
    if qkv_only:
        select["modules"] = ["qkv"]
    if keep_special:
        select["keep_tokens_from_base"] = "special"
    return {
        "merge_method": "linear",
        "models": [{"model": model_a, "parameters": {"weight": alpha}},
                   {"model": model_b, "parameters": {"weight": 1.0 - alpha}}],
        "parameters": {"normalize": False},
        "device": device,
        **({"select": select} if select else {}),
    }


class LayersCommand(click.Command):
    """``--layers 1 2 20`` as scripts write it: the numbers after ``--layers`` are its values
    (click's options take one value each, so they are passed on as ``--layers 1 --layers 2 ...``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        out: list[str] = []
        taking = pending = False  # pending: a --layers with no number yet (click then says so)
        for arg in args:
            if arg == "--layers":
                out += ["--layers"] if pending else []
                taking = pending = True
            elif taking and arg.lstrip("-").isdigit():
                out += ["--layers", arg]
                pending = False
            else:
                out += ["--layers", arg] if pending else [arg]
                taking = pending = False
        return super().parse_args(ctx, out + (["--layers"] if pending else []))


@dataclass(frozen=True)
class Request:
    """A command line, checked against the models and translated."""

    architecture: Architecture
    plan: dict[str, Any]
    output: Path
    notes: tuple[str, ...]


def translate(model_a: str, model_b: str, alpha: float, layers: list[int] | None, qkv_only: bool,
              special_fixes: bool, output_dir: Path | None, device: str) -> Request:
    """Check the command line against both models' headers and configs; the plan it stands for."""
    check_request(alpha, layers, qkv_only)
    layers = sorted(set(layers)) if layers else None
    path_a, path_b = resolve_model(model_a), resolve_model(model_b)
    a, b = Checkpoint(path_a), Checkpoint(path_b)
    try:
        arch = detect(a, b)
    finally:
        a.close()
        b.close()
    check_layers(arch, layers, qkv_only)
    notes = []
    if qkv_only and arch.fused:
        notes.append(f"{arch.family} fuses q, k and v into one projection: --qkv-only merges "
                     f"{', '.join(f.rsplit('.', 1)[-1] for f in arch.qkv)}")
    keep_special = special_fixes and not layers  # with --layers, embeddings and lm_head are A's whole
    if keep_special and not (Path(path_a) / TOKENIZER_JSON).is_file():
        notes.append(f"{model_a} has no {TOKENIZER_JSON}: its special tokens are not known, so their "
                     "embedding and lm_head rows are merged like the others")
        keep_special = False
    plan = linear_plan(path_a, path_b, alpha, layers, qkv_only, keep_special, device)
    output = output_dir or default_output(model_a, model_b, alpha, layers, qkv_only)
    return Request(arch, plan, output, tuple(notes))
