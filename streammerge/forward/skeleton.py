"""A causal LM's module tree from config.json alone, its parameters on the meta device.

transformers builds the model from its own classes for the architecture, so every architecture
it knows runs with its real code. Only parameters go to the meta device: non-persistent buffers
(rotary ``inv_freq``, Gemma's embedding scale) are computed for real while the model is built,
which building under ``torch.device("meta")`` would not do. Nothing from the checkpoint's own
code is imported unless the caller trusts it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streammerge.errors import CheckpointError, MissingExtraError


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingExtraError(
            "running a model needs transformers: pip install 'streammerge[eval]'") from None
    return transformers


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device as it is registered: its
    ``torch.empty`` storage is never touched, and the init that follows runs on meta for free."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


@dataclass
class Skeleton:
    """The model and the parts the layer stream drives by hand."""

    model: nn.Module  # the *ForCausalLM, parameters on meta
    base: nn.Module  # its decoder (model.model, model.transformer, ...)
    layers: nn.ModuleList
    layers_name: str  # the attribute holding the layers: "layers", "h"
    embedding: nn.Module
    norm: nn.Module
    head: nn.Module
    dtype: torch.dtype
    softcap: float | None  # Gemma 2's final_logit_softcapping, applied by its CausalLM head


def _config_dict(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (running a model needs its architecture)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def build_skeleton(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> Skeleton:
    """The meta-device model of ``model_dir/config.json``, in eval mode."""
    transformers = import_transformers()
    raw = _config_dict(model_dir)
    if "auto_map" in raw and not trust_remote_code:
        raise CheckpointError(f"{model_dir}/config.json: this architecture needs the checkpoint's own "
                              "modeling code (auto_map); streammerge runs no code from a checkpoint unless "
                              "--trust-remote-code is given")
    where = f"{model_dir}/config.json"
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: model_type {raw.get('model_type')!r} is not an architecture "
                              f"transformers {transformers.__version__} knows; a newer transformers may "
                              "(pip install -U transformers)") from None
    config.use_cache = False
    try:
        model = _meta_model(transformers, config, dtype, trust_remote_code)
    except (ValueError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: transformers has no causal LM for {type(config).__name__} "
                              f"({first}); only text generation models can be run") from None
    model.eval()
    return _parts(model, model_dir, dtype)


def _meta_model(transformers: Any, config: Any, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """sdpa where the architecture has it; otherwise (Gemma 2's soft-capped attention) its eager
    attention, which is safe here because the model itself builds the masks its layers get."""
    for attention in ("sdpa", "eager"):
        try:
            with _parameters_on_meta():
                return transformers.AutoModelForCausalLM.from_config(
                    config, attn_implementation=attention, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as e:
            if attention != "sdpa" or "scaled_dot_product_attention" not in str(e):
                raise
    raise AssertionError("unreachable")


def _parts(model: nn.Module, model_dir: Path, dtype: torch.dtype) -> Skeleton:
    where = f"{model_dir}/config.json ({type(model).__name__})"
    base = model.base_model
    text = model.config.get_text_config()
    lists = [(n, m) for n, m in base.named_children()
             if isinstance(m, nn.ModuleList) and len(m) == text.num_hidden_layers]
    if len(lists) != 1:
        children = [n for n, _ in base.named_children()]
        raise CheckpointError(f"{where}: cannot tell the decoder layers among {children}")
    layers_name, layers = lists[0]
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise CheckpointError(f"{where}: the model has no output head to score tokens with")
    # the final norm: the one child of the decoder with weights that is neither an embedding
    # (token or learned position) nor the layers
    norms = [n for n, m in base.named_children()
             if m is not layers and not isinstance(m, nn.Embedding) and any(True for _ in m.parameters())]
    if len(norms) != 1:
        raise CheckpointError(f"{where}: cannot tell the final norm among {norms}")
    softcap = getattr(text, "final_logit_softcapping", None)
    norm = getattr(base, norms[0])
    return Skeleton(model, base, layers, layers_name, embedding, norm, head, dtype, softcap)
