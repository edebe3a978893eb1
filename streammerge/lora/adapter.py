"""PEFT LoRA adapter directories, read lazily module by module.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``, whose keys are
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` /
``lora_embedding_B`` for embeddings; old files carry the adapter name before ``.weight``). Any
other key is a whole tensor that replaces the base's (``modules_to_save``, an embedding's
``base_layer`` saved with resized vocabularies), except ``<module>.lora_B.bias``: a bias update
(``lora_bias``; mergekit-extract-lora writes one for every adapted module that has a bias), added
to the base's ``<module>.bias`` times the module's scaling, as PEFT's lora_B layer adds it.

Each target module's update is returned as a pair of factors in the *base tensor's* orientation,
ΔW = left @ right with left ``[rows, r]`` and right ``[r, cols]``, the scaling folded into one of
them, so a row range of ΔW costs ``left[rows] @ right``:

- linear: ΔW = s · B @ A; with ``fan_in_fan_out`` (GPT-2's Conv1D stores W transposed) ΔW = s · (B @ A)ᵀ;
- embedding: ΔW = s · (B @ A)ᵀ, A ``[r, vocab]``, B ``[dim, r]``;

with s = lora_alpha / r, or lora_alpha / √r under ``use_rslora``, r and lora_alpha taken from
``rank_pattern`` / ``alpha_pattern`` by PEFT's rule (a pattern key matches a module name it ends,
after a dot, as a regular expression).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from streammerge.errors import CheckpointError
from streammerge.io.reader import ShardReader, TensorInfo

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# <module>.lora_A[.<adapter name>].weight, or <module>.lora_embedding_A[.<adapter name>]
_BIAS = re.compile(r"^(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias$")
_FACTOR = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<linear>[AB])(?:\.[^.]+)?\.weight|lora_embedding_(?P<embedding>[AB])(?:\.[^.]+)?)$")
# Config switches that change what the adapter computes in ways folding W + s·B·A would not reproduce.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales the merged weight by a learned magnitude",
    "use_qalora": "QA-LoRA (use_qalora) pools its input",
    "trainable_token_indices": "trainable_token_indices stores token deltas",
    "layer_replication": "layer_replication duplicates layers",
    "target_parameters": "target_parameters adapts parameters, not modules",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) activates per token",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its factor keys, scaling and layout."""

    module: str
    a_key: str
    b_key: str
    scale: float
    embedding: bool
    fan_in_fan_out: bool

    @property
    def target(self) -> str:
        """The base tensor this module updates."""
        return f"{self.module}.weight"


class LoraAdapter:
    """A PEFT LoRA adapter: its target modules' factors and the tensors it replaces."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self._read_config()
        weights = self.path / WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{self.path}: no {WEIGHTS} (adapter_model.bin is not read: convert it to safetensors)")
        self._reader = ShardReader(weights)
        try:
            self.modules, self.replaced, self.biases = self._index()
        except BaseException:
            self._reader.close()
            raise

    def _read_config(self) -> dict:
        try:
            config = json.loads((self.path / CONFIG).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no {CONFIG}: not a PEFT adapter directory") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.path / CONFIG}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.path / CONFIG}: not a JSON object")
        kind = config.get("peft_type", "LORA")
        if kind != "LORA":
            raise CheckpointError(f"{self.path}: peft_type {kind!r} is not supported; only LoRA adapters are merged")
        for key, why in _UNSUPPORTED.items():
            if config.get(key):
                raise CheckpointError(f"{self.path}: {key} is set: {why}, which streammerge does not merge; "
                                      "merge it with PEFT's merge_and_unload instead")
        for key in ("r", "lora_alpha"):
            if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
                raise CheckpointError(f"{self.path / CONFIG}: {key!r} must be a positive number, got {config.get(key)!r}")
        return config

    def _index(self) -> tuple[dict[str, LoraModule], dict[str, str], dict[str, tuple[str, float]]]:
        factors: dict[str, dict[str, str]] = {}
        replaced: dict[str, str] = {}
        biases: dict[str, tuple[str, float]] = {}  # base bias name -> (key, scaling)
        for key in self._reader.entries:
            name = key.removeprefix(_PREFIX)
            if (b := _BIAS.match(name)) is not None:
                biases[f"{b['module']}.bias"] = (key, self._scale(b["module"]))
                continue
            m = _FACTOR.match(name)
            if m is None:
                if "lora_" in name:
                    raise CheckpointError(f"{self.path / WEIGHTS}: tensor {key!r} is not a LoRA factor streammerge knows "
                                          "(DoRA magnitudes and other variants are not supported)")
                replaced[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = key
                continue
            factors.setdefault(m["module"], {})[m["linear"] or f"embedding {m['embedding']}"] = key
        modules = {}
        for module, keys in factors.items():
            embedding = "embedding A" in keys or "embedding B" in keys
            a, b = (keys.get("embedding A"), keys.get("embedding B")) if embedding else (keys.get("A"), keys.get("B"))
            if a is None or b is None or len(keys) != 2:
                raise CheckpointError(f"{self.path / WEIGHTS}: module {module!r} needs exactly one A and one B factor, "
                                      f"found {sorted(keys.values())}")
            lm = LoraModule(module, a, b, self._scale(module), embedding, bool(self.config.get("fan_in_fan_out")) and not embedding)
            self._check_factors(lm)
            modules[lm.target] = lm
        return modules, replaced, biases

    def _patterned(self, key: str, module: str) -> float:
        """``r`` or ``lora_alpha`` for one module: its ``rank_pattern`` / ``alpha_pattern`` entry, else the default."""
        patterns = self.config.get({"r": "rank_pattern", "lora_alpha": "alpha_pattern"}[key]) or {}
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's get_pattern_key: first match wins
                return value
        return self.config[key]

    def _scale(self, module: str) -> float:
        r, alpha = self._patterned("r", module), self._patterned("lora_alpha", module)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def _check_factors(self, lm: LoraModule) -> None:
        a, b = self._reader.entries[lm.a_key], self._reader.entries[lm.b_key]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise CheckpointError(f"{self.path}: module {lm.module!r}: factors of shapes {list(a.shape)} and {list(b.shape)} "
                                  "are not matrices (convolution LoRA is not supported)")
        r = self._patterned("r", lm.module)
        if a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(f"{self.path}: module {lm.module!r}: factors {list(a.shape)} and {list(b.shape)} do not have "
                                  f"rank {r} (r / rank_pattern in {CONFIG})")

    def rank(self, target: str) -> int:
        return self._reader.entries[self.modules[target].a_key].shape[0]

    def delta_shape(self, target: str) -> tuple[int, int]:
        lm = self.modules[target]
        a, b = self._reader.entries[lm.a_key].shape, self._reader.entries[lm.b_key].shape
        return (a[1], b[0]) if lm.embedding or lm.fan_in_fan_out else (b[0], a[1])

    def factors(self, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) in float32 (float64 stays), ΔW = left @ right in the base tensor's orientation."""
        lm = self.modules[target]
        a, b = self._reader.read(lm.a_key), self._reader.read(lm.b_key)
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        a, b = a.to(dtype), b.to(dtype)
        if lm.embedding or lm.fan_in_fan_out:
            return a.T, b.T * lm.scale
        return b * lm.scale, a

    def bias_update(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The update of bias ``name`` (lora_B's bias times the scaling), in float32 or wider."""
        key, scale = self.biases[name]
        b = self._reader.read(key, rows)
        return b.to(torch.promote_types(b.dtype, torch.float32)) * scale

    def replacement(self, name: str, rows: slice | None = None) -> torch.Tensor:
        return self._reader.read(self.replaced[name], rows)

    def replacement_info(self, name: str) -> TensorInfo:
        e = self._reader.entries[self.replaced[name]]
        return TensorInfo(e.dtype, e.shape)

    def _same_as_partner(self, name: str, tensors: dict[str, TensorInfo]) -> bool:
        """Whether ``name`` is an output head the base omits because it is tied to its embedding,
        updated as the adapter updates that embedding (mergekit-extract-lora writes the head of a
        tied model too: whole, equal to the embedding, or factored from the same difference)."""
        from streammerge.plan.architecture import tied_partner  # the plan package imports this one

        partner = tied_partner(name, tensors) if name not in tensors else None
        if partner is None:
            return False
        if name in self.replaced:
            return partner in self.replaced and \
                self._reader.sha256(self.replaced[name]) == self._reader.sha256(self.replaced[partner])
        return partner in self.modules and self.modules[partner].embedding

    def check_base(self, tensors: dict[str, TensorInfo], base: Path) -> None:
        """Every target module and replaced tensor exists in the base with this adapter's shape.
        A tied head the base omits, updated as its embedding is, is dropped: the base stores one
        matrix for both, which the embedding's update changes."""
        for name in [n for n in [*self.modules, *self.replaced] if self._same_as_partner(n, tensors)]:
            self.modules.pop(name, None)
            self.replaced.pop(name, None)
        for target in self.modules:
            if target not in tensors:
                raise CheckpointError(f"{self.path}: adapts module {self.modules[target].module!r}, but {base} has no tensor "
                                      f"{target!r}: the adapter was trained on another model")
            if tuple(tensors[target].shape) != self.delta_shape(target):
                raise CheckpointError(f"{self.path}: module {self.modules[target].module!r} updates a {list(self.delta_shape(target))} "
                                      f"weight, but {target!r} in {base} is {list(tensors[target].shape)}: the adapter was trained on another model")
        for name, (key, _) in self.biases.items():
            shape = self._reader.entries[key].shape
            if name not in tensors or tuple(tensors[name].shape) != tuple(shape):
                has = "no such tensor" if name not in tensors else list(tensors[name].shape)
                raise CheckpointError(f"{self.path}: updates bias {name!r} ({key}, shape {list(shape)}), "
                                      f"but {base} has {has}: the adapter was trained on another model")
        for name in self.replaced:
            have = tensors.get(name)
            if have is None or tuple(have.shape) != self.replacement_info(name).shape:
                found = "missing" if have is None else f"of shape {list(have.shape)}"
                raise CheckpointError(f"{self.path}: replaces {name!r} (modules_to_save) with shape {list(self.replacement_info(name).shape)}, "
                                      f"but it is {found} in {base}")

    def fingerprint(self) -> dict[str, tuple[int, str]]:
        """The adapter's weights file (size, header sha256) and its config (size, sha256)."""
        config = (self.path / CONFIG).read_bytes()
        return {self._reader.path.name: (self._reader.size, self._reader.header_sha256),
                CONFIG: (len(config), hashlib.sha256(config).hexdigest())}

    def close(self) -> None:
        self._reader.close()

