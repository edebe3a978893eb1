"""The scoring protocol: which tokens a perplexity is computed on, and with which context.

The text is tokenized once, then cut into windows; a window scores the NLL of ``ids[p]`` given
``ids[:p]`` for its positions ``score_from..len-1``, and the perplexity is exp of the mean over
every scored token of every window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streammerge.errors import DataError


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field has no single truth value
class Window:
    ids: torch.Tensor  # int64 [length], a view of the tokenized text
    score_from: int  # positions score_from..length-1 are scored; >= 1 (position 0 has no context)


@dataclass(frozen=True)
class Protocol:
    seqlen: int = 2048
    stride: int | None = None  # None: non-overlapping windows (GPTQ/SparseGPT); S: HF sliding window
    samples: int | None = None  # keep the first N windows
    join: str = "\n\n"

    def __post_init__(self) -> None:
        if self.seqlen < 2:
            raise DataError(f"seqlen={self.seqlen} is too short: a window scores its positions "
                            "1..seqlen-1 (use --seqlen 2 or more)")
        if self.stride is not None and not 1 <= self.stride <= self.seqlen:
            raise DataError(f"stride={self.stride} is out of range: windows of seqlen={self.seqlen} "
                            f"tokens need 1 <= stride <= {self.seqlen} (use --stride S in that range)")
        if self.samples is not None and self.samples < 1:
            raise DataError(f"samples={self.samples}: at least one window must be kept "
                            "(use --samples 1 or more, or leave it out for every window)")

    @property
    def name(self) -> str:
        return "non-overlapping" if self.stride is None else "sliding-window"

    def describe(self) -> str:
        """The protocol in one line, for the output and the JSON."""
        head = (f"documents joined with {self.join!r}, tokenized once with the model's tokenizer "
                "(default special tokens), ")
        kept = "" if self.samples is None else f", the first {self.samples} kept"
        if self.stride is None:
            return (head + f"non-overlapping {self.seqlen}-token windows, tail dropped{kept}, each "
                    f"window scored on positions 1..{self.seqlen - 1} (GPTQ/SparseGPT protocol)")
        return (head + f"{self.seqlen}-token windows starting every {self.stride} tokens, the last "
                f"ending at the text's end{kept}, each window scoring the tokens no earlier window "
                "scored, from its position 1 on (Hugging Face sliding-window protocol)")

    def as_dict(self) -> dict:
        return {"name": self.name, "seqlen": self.seqlen, "stride": self.stride, "samples": self.samples,
                "join": self.join, "special_tokens": "default", "description": self.describe()}


def tokenize(tokenizer, documents: list[str], join: str) -> torch.Tensor:
    """The documents joined with ``join``, tokenized once with the model's tokenizer and its default
    special tokens (a transformers tokenizer), as int64 [n]: a BOS appears once, at the start."""
    # verbose=False: the text is longer than model_max_length by design; the windows cut it.
    ids = tokenizer(join.join(documents), add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def cut_windows(ids: torch.Tensor, protocol: Protocol) -> list[Window]:
    """The windows ``protocol`` scores over the tokenized text ``ids`` (int64 [n])."""
    n, seqlen = ids.numel(), protocol.seqlen
    if n < seqlen:
        fix = f"use --seqlen {n} or less, or more text" if n >= 2 else "give more text"
        raise DataError(f"data has {n} tokens; one window needs seqlen={seqlen} ({fix})")
    if protocol.stride is None:
        windows = [Window(ids[k * seqlen:(k + 1) * seqlen], 1) for k in range(n // seqlen)]
    else:
        windows = _sliding(ids, seqlen, protocol.stride)
    return windows[:protocol.samples]


def _sliding(ids: torch.Tensor, seqlen: int, stride: int) -> list[Window]:
    """The loop of transformers' "Perplexity of fixed-length models" (docs/source/en/perplexity.md):
    windows ids[begin:begin+seqlen] for begin = 0, S, 2S, ... until one ends at the text's end, the
    last trg_len = end - prev_end tokens of each labelled and the rest set to -100. The model's loss
    shifts labels by one, so a window's position 0 is never scored: a window scores its positions
    max(1, len - trg_len)..len-1. With stride < seqlen that is every token after the text's first
    exactly once; with stride == seqlen it is the non-overlapping windows plus the tail, each
    window's first token unscored. (The doc weights each window's mean loss by its valid labels
    minus one, one fewer than the model averaged over in every window after the first; the mean
    here is over exactly the scored tokens.)"""
    n = ids.numel()
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + seqlen, n)
        length, trg_len = end - begin, end - prev_end
        score_from = max(1, length - trg_len)
        if score_from < length:  # a 1-token tail window (stride == seqlen) scores nothing
            windows.append(Window(ids[begin:end], score_from))
        prev_end = end
        if end == n:
            break
    return windows
