"""Router weights from prompts, as mergekit-moe 0.1.5 computes them (``mergekit/moe/router.py``).

Every layer's router is a matrix W [experts, hidden]: the gate logits of a token whose input to
that layer is x are W x, so expert e's row should point the way its prompts' states do. For
expert e with positive prompts P and negative prompts N, and per layer l,

    v_e(l) = f_l(P) - f_l(N)        (f_l(N) = 0 without negative prompts)
    W_l[e] = v_e(l) / max(||v_e(l)||, 1e-8)

where ``f`` depends on ``gate_mode``:

* ``hidden`` (and ``hidden_last``): f_l(P) = mean over the prompts of layer l's *input* hidden
  state at the last token (the embeddings for layer 0), computed in bfloat16 as mergekit does;
  ``hidden_avg`` takes each prompt's mean over its positions, padding included, instead.
  The base model runs layer by layer through ``LayerStream``: one layer's weights in memory.
* ``cheap_embed``: f_l(P) = s / max(||s||, 1e-8), s = sum of the token embeddings of every
  prompt's tokens (padding masked out), the same for every layer; only those embedding rows are read.
* ``random``: W_l[e] ~ N(0, 1) elementwise; ``uniform_random``: U(-1/sqrt(h), 1/sqrt(h)) as
  ``nn.Linear`` initialises it. Drawn from ``torch.Generator().manual_seed(seed)`` for the whole
  [layers, experts, hidden] block at once, which gives the bytes mergekit-moe draws after
  ``--random-seed seed``.

Prompts are tokenized as mergekit does: the BOS token's text prepended, no special tokens added,
padded on the left with BOS (EOS when there is none) in one batch per list. The positions of a
padded prompt are not shifted (the model numbers them 0..len-1, padding included), as in mergekit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streammerge.errors import CheckpointError, PlanError
from streammerge.evaluation.evaluate import default_activation_budget
from streammerge.evaluation.evaluate import load_tokenizer
from streammerge.forward import Batch, LayerStream
from streammerge.forward.weights import Source
from streammerge.moe.config import HIDDEN_MODES, Expert, MoEConfig

# the prompts' hidden states held in memory; beyond it they spill to disk
ACTIVATION_BUDGET = 64 << 20
_EPS = 1e-8


def gate_vectors(
    config: MoEConfig,
    base_dir: Path,
    base: Source,
    seed: int,
    *,
    spill_dir: str | None = None,
    progress: bool = False,
    max_memory: int | None = None,
) -> torch.Tensor:
    """W [layers, experts, hidden] for ``config.gated`` (routed experts, then gated shared ones):
    float32, or bfloat16 for the hidden modes, whose layer stream keeps within ``max_memory``."""
    text = _text_config(base_dir)
    shape = (text["num_hidden_layers"], len(config.gated), text["hidden_size"])
    if config.gate_mode == "random":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if config.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / shape[2])
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 * scale - scale
    _check_prompts(config, base_dir)
    tokenizer = _prompt_tokenizer(base_dir)
    batches = [
        (e, [_tokenize(tokenizer, p) for p in (e.positive_prompts, e.negative_prompts) if p])
        for e in config.gated
    ]
    if config.gate_mode == "cheap_embed":
        embed = _CheapEmbedding(base, shape[0], text["vocab_size"])
        return _normalized(batches, embed)
    states = _hidden_states(
        base_dir, base, [b for _, bs in batches for b in bs], config.gate_mode, spill_dir, progress,
        max_memory)
    it = iter(states)
    return _normalized([(e, [next(it) for _ in bs]) for e, bs in batches], lambda x: x)


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """The layers whose router [experts, hidden] has a condition number σ_max/σ_min above
    ``threshold``: rows so alike that some experts would rarely win (mergekit-moe's warning)."""
    return [i for i in range(gates.shape[0]) if torch.linalg.cond(gates[i].float()).item() > threshold]


def _normalized(batches: list[tuple[Expert, list[Any]]], f: Any) -> torch.Tensor:
    """Per expert (f(positive) - f(negative)) / its norm, per layer: [layers, experts, hidden]."""
    rows = []
    for _, parts in batches:
        v = f(parts[0])
        if len(parts) > 1:
            v = v - f(parts[1])
        rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=_EPS))
    return torch.stack(rows, dim=0).permute(1, 0, 2)


def _check_prompts(config: MoEConfig, base_dir: Path) -> None:
    missing = [k for k, e in enumerate(config.gated) if not e.positive_prompts]
    if missing:
        k = missing[0]
        which = (
            f"experts[{k}]"
            if k < len(config.experts)
            else f"shared_experts[{k - len(config.experts)}]"
        )
        raise PlanError(
            f"{which}: no positive_prompts; gate_mode {config.gate_mode} computes its router row "
            f"from them with {base_dir} (give prompts, or use gate_mode random)"
        )


def _text_config(base_dir: Path) -> dict[str, Any]:
    from streammerge.forward.skeleton import import_transformers

    config = import_transformers().AutoConfig.from_pretrained(base_dir).get_text_config()
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
    }


def _prompt_tokenizer(base_dir: Path) -> Any:
    """The base's tokenizer, set up as mergekit-moe sets it: left padding with BOS (else EOS)."""
    try:
        tokenizer = load_tokenizer(base_dir)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the routers' prompts are tokenized with the base's tokenizer "
                              "(or use gate_mode random)") from None
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenize(tokenizer: Any, prompts: list[str]) -> Batch:
    enc = tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    return Batch(enc["input_ids"], enc["attention_mask"])


class _CheapEmbedding:
    """f(prompts) of ``cheap_embed``: the masked sum of the prompts' token embeddings (float32, in
    mergekit's order of summation: over positions, then prompts), normalised, per layer."""

    def __init__(self, base: Source, layers: int, vocab: int):
        self.base, self.layers, self.vocab = base, layers, vocab
        self.name = "model.embed_tokens.weight"
        if self.name not in base.tensors:
            raise PlanError(
                f"gate_mode cheap_embed: the base model has no {self.name!r} to embed the prompts with"
            )

    def __call__(self, batch: Batch) -> torch.Tensor:
        ids = batch.ids
        if ids.numel() and int(ids.max()) >= self.vocab:
            raise PlanError(
                f"gate_mode cheap_embed: token id {int(ids.max())} is outside the base's "
                f"vocabulary of {self.vocab}; the tokenizer does not match the model"
            )
        used = torch.unique(ids)
        # only the prompts' rows are read: a one-hot product with the whole matrix gives the same rows
        rows = torch.cat(
            [self.base.read(self.name, slice(t, t + 1)).float() for t in used.tolist()]
        )
        h = rows[torch.searchsorted(used, ids)]  # [prompts, positions, hidden]
        s = (h * batch.attention_mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        return (s / s.norm(dim=-1, keepdim=True).clamp(min=_EPS)).repeat(self.layers, 1)


def _hidden_states(
    base_dir: Path,
    base: Source,
    batches: list[Batch],
    mode: str,
    spill_dir: str | None,
    progress: bool,
    max_memory: int | None,
) -> list[torch.Tensor]:
    """Per batch, f [layers, hidden]: the mean over its prompts of each layer's input at the last
    position (``hidden``, ``hidden_last``) or averaged over positions (``hidden_avg``), bfloat16."""
    assert mode in HIDDEN_MODES
    stream = LayerStream(base_dir, base, dtype=torch.bfloat16, activation_budget=0, spill_dir=spill_dir)
    # what --max-memory leaves after two layers and a batch's working memory (an error if nothing),
    # as for `streammerge eval`; without a budget, ACTIVATION_BUDGET in memory and the rest spilled
    tokens = max(b.ids.numel() for b in batches)
    stream.activation_budget = (ACTIVATION_BUDGET if max_memory is None
                                else default_activation_budget(stream, max_memory, tokens))
    stream.progress = progress
    taken: list[list[torch.Tensor]] = [
        [] for _ in batches
    ]  # per batch, per layer: [prompts, hidden]

    @contextlib.contextmanager
    def capture(index: int, layer: nn.Module) -> Iterator[None]:
        seen = iter(range(len(batches)))  # every batch runs through the layer in order

        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            # mergekit: stack(hidden_states)[:, :, -1, :], or .sum(dim=2) / positions
            taken[next(seen)].append(
                x[:, -1, :].clone() if mode != "hidden_avg" else x.sum(dim=1) / x.shape[1]
            )

        handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    stream.run(batches, hook=capture).close()
    out = []
    for per_layer in taken:
        states = torch.stack(per_layer)  # [layers, prompts, hidden]
        out.append(states.sum(dim=1) / states.shape[1])
    return out
