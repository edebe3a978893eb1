"""Greedy continuation of prompts through the layer stream, one pass over the layers per token.

Prompts are left-padded into one batch with a padding mask and positions counted from each
prompt's first real token (what ``generate`` does), so a padded prompt continues exactly as it
would alone. The decoder makes its own KV cache on the first pass; each layer adds its keys and
values under its index, and later passes attend to them, so each new token runs one position.
"""

from __future__ import annotations

from typing import Any

import torch

from streammerge.forward.head import VocabHead
from streammerge.forward.stream import Batch, LayerStream


def _cache_in(call_args: tuple, call_kwargs: dict) -> Any:
    from transformers.cache_utils import Cache

    found = [v for v in (*call_args, *call_kwargs.values()) if isinstance(v, Cache)]
    if not found:
        raise RuntimeError("the decoder made no KV cache for its layers")
    return found[0]


def greedy(stream: LayerStream, prompts: list[list[int]], max_new_tokens: int, eos: set[int],
           pad: int, on_token: Any = None) -> list[list[int]]:
    """The next ``max_new_tokens`` most likely tokens of each prompt (fewer where one ends in an
    end-of-sequence token, which is kept). ``on_token()`` is called after each pass."""
    head = VocabHead(stream)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    cache: Any = True
    step = ids
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step.shape[1]:]
        batch = Batch(step, mask, positions)
        if cache is True:
            _, calls = stream.prepare(batch, cache=True, upto=0)
            cache = _cache_in(calls[0].args, calls[0].kwargs)
        with stream.run([batch], cache=cache) as store:
            last = torch.arange(len(prompts)) * step.shape[1] + step.shape[1] - 1
            chosen = head.run(store, [last]).argmax[0]
        for row, token in enumerate(chosen.tolist()):
            if not done[row]:
                out[row].append(token)
                done[row] = token in eos
        if on_token is not None:
            on_token()
        if all(done):
            break
        step = torch.where(torch.tensor(done), pad, chosen)[:, None]
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
    return out
