"""A decoder layer's weights, read from a checkpoint and loaded into the meta skeleton, then released.

Checkpoint tensors are grouped by layer from their names alone (``model.layers.7.…``, ``h.7.…``);
transformers' own loader puts them into the module, so its checkpoint conversions run as in
``from_pretrained`` (Mixtral's per-expert tensors fused into ``experts.gate_up_proj``, GPT-2's
prefix-less names, legacy ``gamma``/``beta``). Releasing a layer puts its meta parameters back:
the memory is freed and the module is ready for the next load.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from streammerge.errors import CheckpointError
from streammerge.forward.skeleton import Skeleton, import_transformers
from streammerge.io.reader import Checkpoint
from streammerge.lora.overlay import AdaptedCheckpoint

Source = Checkpoint | AdaptedCheckpoint


class LayerWeights:
    """Which checkpoint tensors make up each layer, and loading them into the skeleton."""

    def __init__(self, skeleton: Skeleton, checkpoint: Source):
        self.skeleton, self.checkpoint = skeleton, checkpoint
        pattern = re.compile(rf"(?:^|\.){re.escape(skeleton.layers_name)}\.(\d+)\.")
        self.layer_keys: dict[int, list[str]] = defaultdict(list)
        rest = []
        for name in checkpoint.tensors:
            match = pattern.search(name)
            (self.layer_keys[int(match.group(1))] if match else rest).append(name)
        names = self._model_names(rest)
        self.embedding_key = self._key_of(names, skeleton.embedding.weight, "input embedding")
        self.head_key = self._head_key(names)
        # everything besides the layers, the token embedding and the head: final norm, learned
        # position embeddings; small, so held for the whole run
        self.resident_keys = [k for k in rest if k not in (self.embedding_key, self.head_key)]
        self._meta = {i: [(m, n, p) for m in layer.modules() for n, p in m._parameters.items()
                          if p is not None] for i, layer in enumerate(skeleton.layers)}

    def _model_names(self, keys: list[str]) -> dict[str, str]:
        """Checkpoint name -> the model's parameter name, as transformers' loader renames them
        (GPT-NeoX's ``embed_out`` is ``lm_head``, GPT-2's ``wte`` is ``transformer.wte``)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        model = self.skeleton.model
        mapping = get_model_conversion_mapping(model)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        meta = model.state_dict()
        names = {}
        for key in keys:
            name, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            names[key] = name if name in meta or key not in meta else key
        return names

    def checkpoint_names(self, index: int) -> dict[str, str]:
        """Layer ``index``'s model parameter names -> the checkpoint tensor each is loaded from.
        Only parameters made from one tensor are named: Mixtral's per-expert tensors, which the
        loader fuses into one ``experts.gate_up_proj``, have no single name."""
        sources: dict[str, list[str]] = defaultdict(list)
        for key, name in self._model_names(self.layer_keys[index]).items():
            sources[name].append(key)
        return {name: keys[0] for name, keys in sources.items() if len(keys) == 1}

    def _key_of(self, names: dict[str, str], param: nn.Parameter, what: str) -> str:
        wanted = [n for n, p in self.skeleton.model.named_parameters(remove_duplicate=False) if p is param]
        found = [key for key, name in names.items() if name in wanted]
        if not found:
            raise CheckpointError(f"{self.checkpoint.path}: no {what} tensor "
                                  f"(the model calls it {wanted[0]})")
        return found[0]

    def _head_key(self, names: dict[str, str]) -> str:
        try:
            return self._key_of(names, self.skeleton.head.weight, "output head")
        except CheckpointError:
            if self.skeleton.head.weight is self.skeleton.embedding.weight or getattr(
                    self.skeleton.model.config.get_text_config(), "tie_word_embeddings", False):
                return self.embedding_key  # tied: the head is the embedding matrix
            raise

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors ``keys``, as stored (the read runs on a prefetch thread)."""
        return {k: self.checkpoint.read(k) for k in keys}

    def load(self, tensors: dict[str, torch.Tensor], modules: list[nn.Module], what: str) -> None:
        """Put ``tensors`` into the skeleton with transformers' loader; every parameter of
        ``modules`` must come out of the meta device."""
        transformers = import_transformers()
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        model, dtype = self.skeleton.model, self.skeleton.dtype
        plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
        logging = transformers.utils.logging
        bar = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()  # the loader's per-call bar would print once per layer
        try:
            convert_and_load_state_dict_in_model(model, tensors, LoadStateDictConfig(
                weight_mapping=get_model_conversion_mapping(model), dtype=dtype, dtype_plan=plan))
        finally:
            if bar:
                logging.enable_progress_bar()
        missing = [n for m in modules for n, p in m.named_parameters() if p.device.type == "meta"]
        if missing:
            raise CheckpointError(f"{self.checkpoint.path}: {what} lacks {len(missing)} weight(s) the "
                                  f"architecture needs, e.g. {missing[:3]} (read {sorted(tensors)[:4]}…)")

    def load_resident(self) -> None:
        """The final norm and any other small non-layer weights, for the whole run."""
        resident = [m for n, m in self.skeleton.base.named_children()
                    if m is not self.skeleton.layers and m is not self.skeleton.embedding]
        self.load(self.read(self.resident_keys), resident, "the model outside its layers")

    def release(self, index: int) -> None:
        """Layer ``index`` back on the meta device; its pages may leave the page cache."""
        for module, name, meta in self._meta[index]:
            module._parameters[name] = meta
        for key in self.layer_keys[index]:
            self.checkpoint.release(key)

    def rows(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (sorted, unique) of the 2-D tensor ``key``, in the run's dtype, read as runs of
        consecutive rows so an embedding is never read whole."""
        out = torch.empty(len(ids), self.checkpoint.tensors[key].shape[1], dtype=self.skeleton.dtype)
        breaks = (torch.nonzero(ids[1:] - ids[:-1] != 1).flatten() + 1).tolist()
        for start, stop in zip([0, *breaks], [*breaks, len(ids)]):
            first = int(ids[start])
            out[start:stop] = self.checkpoint.read(key, slice(first, first + stop - start))
        return out
