"""The plan schema: mergekit's keys for what mergekit has, native keys for the rest."""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A parameter value: a scalar, a gradient (list of values, interpolated over the layers) or a list
# of {filter, value} conditionals (or one) whose value may itself be a gradient. Plan loading
# converts each value to its parameter's type (``streammerge.plan.parameters.typed``).
Scalar = Union[bool, int, float, str]
Gradient = list[Scalar]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: Optional[str] = None
    value: Union[Scalar, Gradient]


ParamValue = Union[Scalar, Gradient, list[Conditional], Conditional]

DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")
# Where and how a merge runs, never what it writes: left out of every file of the output.
EXECUTION_KEYS = ("executor", "ray_address", "shards_per_task")
# Keys only streammerge knows: a plan using any of them is a native plan, validated strictly.
NATIVE_KEYS = ("output", "shard_size", "max_memory", "chunk_size", "compute_dtype", "seed", "device",
               "max_gpu_memory", "vocab_policy", "select", "cache_dir", "allow_nonfinite", "adapters",
               "adapter_output", "allow_crimes", "copy_tokenizer", "write_model_card", "calibration",
               "inputs", "donor", "disk_budget", "download_dir", "stream_inputs", *EXECUTION_KEYS)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as "5GB", "512M", "2GiB" (K/M/G/T: powers of 1000; KiB/MiB/...: 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.match(str(value))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a size (use bytes or a string such as '5GB', '512MiB')")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmgt".index((m.group(2) or " ").lower()))


class Calibration(BaseModel):
    """Where a model's statistics of calibration data come from (the data-aware methods read them):
    ``data`` (a text/jsonl file or a dataset) cut into windows as ``streammerge eval`` cuts them and
    measured into a cache, or ``stats``, a directory ``streammerge calibrate`` wrote."""

    model_config = ConfigDict(extra="forbid")
    data: Optional[str] = None
    stats: Optional[str] = None
    samples: int = Field(default=128, gt=0)
    seqlen: int = Field(default=2048, gt=1)
    shuffle: bool = False  # random windows drawn with `seed` instead of the first `samples`
    seed: int = 0
    text_field: str = "text"  # the field of a jsonl file or dataset that holds the text

    @model_validator(mode="after")
    def _data_or_stats(self) -> "Calibration":
        if (self.data is None) == (self.stats is None):
            raise ValueError("a calibration gives exactly one of 'data' (a file or dataset to measure) "
                             "and 'stats' (a statistics directory from streammerge calibrate)")
        fields = type(self).model_fields
        windows = [k for k in ("samples", "seqlen", "shuffle", "seed", "text_field")
                   if getattr(self, k) != fields[k].default]
        if self.stats is not None and windows:
            raise ValueError(f"'{windows[0]}' describes the windows cut from 'data'; with 'stats' the "
                             "statistics directory was measured already: drop it")
        return self


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    calibration: Optional[Calibration] = None  # this model's own; wins over the plan's


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    calibration: Optional[Calibration] = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: Optional[str] = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class ModelToken(BaseModel):
    """A token's embedding taken from a model's row of ``token`` (or ``token_id``) in its own vocabulary."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token: Optional[str] = None
    token_id: Optional[int] = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_of(self) -> "ModelToken":
        if (self.token is None) == (self.token_id is None):
            raise ValueError("a model_token source gives exactly one of 'token' and 'token_id'")
        return self


class ZeroToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenSpec(BaseModel):
    """Where a token's embedding row comes from for models that lack it (every model with ``force``)."""

    model_config = ConfigDict(extra="forbid")
    source: Union[ModelToken, ZeroToken, str, None] = None  # a model path; None: the default rule
    force: bool = False


class TokenizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = "union"  # "union", "base" or a model
    tokens: dict[str, TokenSpec] = Field(default_factory=dict)
    pad_to_multiple_of: Optional[int] = Field(default=None, gt=0)


class Module(BaseModel):
    """One module of a multi-module model (``modules:``): a ``models:`` or ``slices:`` merge of its tensors."""

    model_config = ConfigDict(extra="forbid")
    models: Optional[list[ModelEntry]] = Field(default=None, min_length=1)
    slices: Optional[list[OutputSlice]] = Field(default=None, min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _models_or_slices(self) -> "Module":
        if (self.models is None) == (self.slices is None):
            raise ValueError("a module gives exactly one of 'models' and 'slices'")
        return self


class Selection(BaseModel):
    """What to merge; every other tensor is copied from the base (or the first model)."""

    model_config = ConfigDict(extra="forbid")
    layers: Optional[list[int]] = Field(default=None, min_length=1)  # only these (output) layers
    modules: Optional[list[str]] = Field(default=None, min_length=1)  # only tensors whose name contains one of these
    keep_from_base: list[Literal["embeddings", "lm_head"]] = Field(default_factory=list)
    # rows of merged embeddings and heads kept from the base (or the first model): "special" (the
    # output tokenizer's special tokens) or tokens by their strings
    keep_tokens_from_base: Union[Literal["special"], list[str], None] = None


class InputRecord(BaseModel):
    """What an input was when a merge ran (its output's ``streammerge_plan.yaml``): the Hub revision
    it resolved to, and each weights file's size and header sha256, checked before merging again."""

    model_config = ConfigDict(extra="forbid")
    revision: Optional[str] = None
    files: dict[str, tuple[int, str]]


class AdapterEntry(BaseModel):
    """A LoRA adapter of the native ``adapters:`` list, folded into ``base_model``."""

    model_config = ConfigDict(extra="forbid")
    path: str
    weight: float = 1.0
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class AdapterOutput(BaseModel):
    """Write the merged adapter (a PEFT adapter directory) instead of a model."""

    model_config = ConfigDict(extra="forbid")
    combination: Literal["cat", "svd"] = "cat"  # cat: the adapters' factors stacked (exact); svd: truncated to `rank`
    rank: Optional[int] = Field(default=None, gt=0)  # svd's rank (default: the largest input rank)
    clamp: Optional[float] = Field(default=None, gt=0, le=1)  # svd: clamp factors to this quantile of their entries


class MergePlan(BaseModel):
    """A validated plan. Model paths are resolved; nothing has been read from the checkpoints yet."""

    model_config = ConfigDict(extra="forbid")

    # mergekit's keys
    merge_method: str
    models: Optional[list[ModelEntry]] = Field(default=None, min_length=1)
    slices: Optional[list[OutputSlice]] = Field(default=None, min_length=1)
    modules: Optional[dict[str, Module]] = Field(default=None, min_length=1)
    base_model: Optional[str] = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: Optional[Literal["bfloat16", "float16", "float32", "float64"]] = None
    out_dtype: Optional[Literal["bfloat16", "float16", "float32", "float64"]] = None
    tokenizer_source: Optional[str] = None  # "base", "union" or a model
    tokenizer: Optional[TokenizerSpec] = None
    chat_template: Optional[str] = None  # "auto", a built-in name or a Jinja template

    # native keys
    output: Optional[str] = None
    shard_size: int = 5_000_000_000
    max_memory: Optional[int] = None
    chunk_size: Optional[int] = Field(default=None, gt=0)
    compute_dtype: Literal["auto", "float32", "float64"] = "auto"
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where the kernels run; auto: CUDA when present
    max_gpu_memory: Optional[int] = None  # GPU bytes for working chunks (default: a share of the free memory)
    # vocabulary matrices whose row counts differ, without a tokenizer to align them: refused, cut
    # to the common rows (mergekit's --unsafe-truncate-embeddings) or given the first input's rows
    vocab_policy: Literal["error", "truncate", "base"] = "error"
    select: Optional[Selection] = None
    cache_dir: Optional[str] = None  # for models fetched from the Hugging Face Hub
    # bytes of Hub downloads plus output (on the downloads' filesystem) on disk at once; with it,
    # Hub shards are downloaded just in time into download_dir (default: in the staging directory)
    disk_budget: Optional[int] = None
    download_dir: Optional[str] = None
    # Hub tensors read by HTTP range requests, no input shard stored: disk_budget counts the output
    stream_inputs: bool = False
    allow_nonfinite: bool = False  # merge inputs holding NaN/Inf and write non-finite results instead of stopping
    adapter_output: Optional[AdapterOutput] = None  # the merged LoRA adapter is the output
    allow_crimes: bool = False  # merge inputs of different architectures (mergekit's --allow-crimes)
    copy_tokenizer: bool = True  # copy the donor's tokenizer files when the plan builds no tokenizer
    write_model_card: bool = True  # README.md describing the merge
    calibration: Optional[Calibration] = None  # every model's, unless its entry gives its own
    inputs: Optional[dict[str, InputRecord]] = None  # a record's inputs by reference: must not have changed
    # the model config.json, the tokenizer files and every tensor not merged come from (default: the
    # base, else the first model); it need not be merged
    donor: Optional[str] = None
    # local: threads in this process; ray: a Ray task per output shard (or shards_per_task of
    # them), on a cluster at ray_address (default: RAY_ADDRESS, else one started for the run)
    executor: Literal["local", "ray"] = "local"
    ray_address: Optional[str] = None
    shards_per_task: int = Field(default=1, gt=0)

    @model_validator(mode="after")
    def _models_or_slices(self) -> "MergePlan":
        if sum(x is not None for x in (self.models, self.slices, self.modules)) != 1:
            raise ValueError("give exactly one of 'models', 'slices' and 'modules'")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or a 'tokenizer:' block, not both")
        if self.donor is not None and self.models is None:
            raise ValueError("'donor' needs a 'models:' plan (slices and modules renumber or split the "
                             "layers it would lend)")
        if self.donor is not None and self.tokenizer_spec is not None:
            raise ValueError("'donor' lends its tokenizer files and rows as they are; a built tokenizer "
                             "('tokenizer_source' or 'tokenizer:') re-indexes them: give one of the two")
        if self.adapter_output is not None and (self.disk_budget, self.download_dir) != (None, None):
            raise ValueError("'disk_budget' and 'download_dir' govern the downloads of a merged "
                             "model's weights; adapter_output reads only adapters: drop them")
        if self.adapter_output is not None and self.stream_inputs:
            raise ValueError("'stream_inputs' reads a merged model's weights from the Hub; "
                             "adapter_output reads only adapters: drop it")
        if self.stream_inputs and self.download_dir is not None:
            raise ValueError("'stream_inputs' (--stream-inputs) downloads nothing, so it has no "
                             "'download_dir' (--download-dir): drop one of them")
        if self.executor != "ray" and (self.ray_address is not None or self.shards_per_task != 1):
            raise ValueError("'ray_address' and 'shards_per_task' (--ray-address, --shards-per-task) "
                             "apply to executor: ray (--executor ray)")
        if self.executor == "ray" and self.adapter_output is not None:
            raise ValueError("executor: ray writes a merged model's shards; adapter_output writes one "
                             "adapter: drop one of them")
        if self.executor == "ray" and (self.disk_budget, self.download_dir) != (None, None):
            raise ValueError("'disk_budget' and 'download_dir' budget one machine's downloads; with "
                             "executor: ray each node reads its inputs from a path every node sees "
                             "or from the Hub (stream_inputs): drop them")
        return self

    @property
    def tokenizer_spec(self) -> TokenizerSpec | None:
        """The tokenizer to build: the ``tokenizer:`` block, or ``tokenizer_source`` as one."""
        if self.tokenizer_source is not None:
            return TokenizerSpec(source=self.tokenizer_source)
        return self.tokenizer

    @field_validator("shard_size", "max_memory", "max_gpu_memory", "disk_budget", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return None if v is None else parse_size(v)
