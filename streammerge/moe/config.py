"""mergekit-moe's config file (mergekit 0.1.5, ``mergekit/moe/config.py``), read unchanged.

::

    base_model: path-or-hub-id          # attention, norms, embeddings and the prompts' model
    gate_mode: hidden | cheap_embed | random | uniform_random   (default hidden)
    dtype: bfloat16                      # default: the base's torch_dtype
    experts_per_token: 2
    architecture: mixtral | qwen | qwen3 | deepseek   (default: the first that fits, Mixtral first)
    experts:
      - source_model: ...
        positive_prompts: [...]
        negative_prompts: [...]          # optional
        noise_scale: 0.01                # optional: + N(0, noise_scale^2) on every MLP weight
        residual_scale: 0.5              # optional: down_proj times this
    shared_experts: [...]                # as experts (Qwen2-MoE, DeepSeek)
    tokenizer_source / tokenizer: ...    # accepted; the tokenizer files are copied from it

The refusals are mergekit's ``is_bad_config``, as one-line ``PlanError``s naming the key.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from streammerge.errors import PlanError
from streammerge.plan.load import PlanWarning, describe_error

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
# mergekit's router accepts these two spellings of `hidden` as well: the prompts' mean token, or
# (as `hidden`) their last one.
HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")


class Expert(BaseModel):
    """One dense model whose MLP becomes an expert of every layer."""

    model_config = ConfigDict(
        extra="ignore"
    )  # as mergekit: unknown keys are not read (load_config warns)

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoEConfig(BaseModel):
    """A mergekit-moe config file."""

    model_config = ConfigDict(extra="ignore")

    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: Literal[
        "hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"
    ] = "hidden"
    dtype: Literal["bfloat16", "float16", "float32", "float64"] | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    tokenizer_source: str | None = None
    tokenizer: Any | None = None  # mergekit-yaml's tokenizer block; only its `source` is read here

    @property
    def gated(self) -> list[Expert]:
        """The experts a router row is computed for, in row order (mergekit-moe's ``need_gates``):
        the routed experts, then the shared ones when they have prompts or the gates are random."""
        shared = self.shared_experts or []
        if shared and (
            any(e.positive_prompts for e in shared)
            or self.gate_mode in ("random", "uniform_random")
        ):
            return [*self.experts, *shared]
        return list(self.experts)

    @property
    def tokenizer_donor(self) -> str | None:
        """Where the output's tokenizer files come from: tokenizer_source, tokenizer.source, else None
        (the base's)."""
        source = self.tokenizer_source
        if source is None and isinstance(self.tokenizer, dict):
            source = self.tokenizer.get("source")
        return None if source in (None, "base") else str(source)

    def fingerprint(self, seed: int) -> str:
        """sha256 of everything that decides the output's values: a partial output is resumed only
        under the same one."""
        doc = json.dumps({"config": self.model_dump(mode="json"), "seed": seed}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()


def load_config(source: str | Path | dict, allow_all_same: bool = False) -> MoEConfig:
    """The config at ``source`` (a YAML file or its mapping), checked as mergekit-moe checks it."""
    where = str(source) if not isinstance(source, dict) else "moe config"
    if isinstance(source, dict):
        raw: Any = source
    else:
        try:
            raw = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
        except OSError as e:
            raise PlanError(f"{source}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise PlanError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: a mergekit-moe config is a mapping with base_model and experts")
    try:
        config = MoEConfig.model_validate(raw)
    except pydantic.ValidationError as e:
        raise PlanError(f"{where}: {describe_error(e)}") from None
    _check(config, where, allow_all_same)
    for key in _unknown_keys(raw):
        warnings.warn(
            f"{where}: {key}: not a mergekit-moe key; ignored (as mergekit-moe ignores it)",
            PlanWarning,
            stacklevel=2,
        )
    return config


def _unknown_keys(raw: dict) -> list[str]:
    known, per_expert = set(MoEConfig.model_fields), set(Expert.model_fields)
    unknown = [str(k) for k in raw if k not in known]
    for section in ("experts", "shared_experts"):
        for k, e in enumerate(raw.get(section) or []):
            unknown += [
                f"{section}[{k}].{x}"
                for x in (e if isinstance(e, dict) else {})
                if x not in per_expert
            ]
    return unknown


def _check(config: MoEConfig, where: str, allow_all_same: bool) -> None:
    """mergekit's ``is_bad_config``: what would give a model that cannot route."""
    if config.experts_per_token < 1:
        raise PlanError(
            f"{where}: experts_per_token is {config.experts_per_token}; it must be at least 1"
        )
    if len(config.experts) < config.experts_per_token:
        raise PlanError(
            f"{where}: {len(config.experts)} experts but experts_per_token "
            f"{config.experts_per_token}; give at least as many experts"
        )
    if config.gate_mode in ("random", "uniform_random"):
        return  # the prompts are not read
    for k, expert in enumerate(config.experts):
        if not expert.positive_prompts:
            raise PlanError(
                f"{where}: experts[{k}] ({expert.source_model}) has no positive_prompts; "
                f"gate_mode {config.gate_mode} computes its router row from them"
            )

    def prompts(e: Expert) -> tuple:
        return tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())

    if len(config.experts) > 1 and all(
        prompts(e) == prompts(config.experts[0]) for e in config.experts
    ):
        raise PlanError(
            f"{where}: every expert has the same positive_prompts and negative_prompts, so "
            "every router row would be the same; give each expert prompts of its own"
        )
    if (
        not allow_all_same
        and len(config.experts) > 1
        and all(e.source_model == config.experts[0].source_model for e in config.experts)
    ):
        raise PlanError(
            f"{where}: every expert is {config.experts[0].source_model}: the MoE would compute "
            "the same as that model at a multiple of the cost; pass "
            "--i-understand-this-is-not-useful-without-training to build it anyway"
        )
