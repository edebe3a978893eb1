"""``evaluate``: perplexity and greedy continuations of any checkpoint, run layer by layer.

The model is opened as a plan opens one (a directory, ``org/name[@revision]``, ``X+adapter``),
the data is tokenized once and cut into windows by the protocol, every window runs through the
layer stream, and the head scores each window's positions. Memory is one layer's weights, the
activations that fit the budget (the rest spill to disk) and the head's blocks.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from streammerge.errors import CheckpointError, DataError, PlanError
from streammerge.evaluation.data import read_documents
from streammerge.evaluation.peak import PeakRss
from streammerge.evaluation.windows import Protocol, Window, cut_windows, tokenize
from streammerge.forward import Batch, LayerStream, VocabHead
from streammerge.forward.generate import greedy
from streammerge.forward.skeleton import import_transformers
from streammerge.forward.weights import Source
from streammerge.lora.overlay import open_checkpoints
from streammerge.lora.reference import split_reference
from streammerge.plan.load import resolve_model

BATCH_TOKENS = 2048  # tokens run through a layer at once by default: bounds a layer's working memory
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Generation:
    prompt: str
    text: str  # the continuation alone, decoded
    tokens: list[int]


@dataclass
class EvalResult:
    model: str
    perplexity: float | None  # None when no data was scored (prompts only)
    nll: float | None  # mean negative log-likelihood per scored token, in nats
    tokens: int  # scored tokens
    windows: int
    seqlen: int
    seconds: float
    peak_rss_bytes: int
    protocol: dict[str, Any]
    dtype: str
    spilled_bytes: int  # activation bytes that went to the spill file at the peak
    generations: list[Generation] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def open_model(ref: str | Path, cache_dir: str | None = None) -> tuple[Path, Source]:
    """The directory holding the config and tokenizer, and the checkpoint (adapter folded in)."""
    resolved = resolve_model(str(ref), cache_dir)
    return Path(split_reference(resolved)[0]), open_checkpoints([resolved])[0]


def load_tokenizer(model_dir: Path) -> Any:
    transformers = import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{model_dir}: no tokenizer transformers can load ({first}); evaluation "
                              "needs the model's tokenizer files (tokenizer.json or tokenizer.model with "
                              "tokenizer_config.json)") from None


def _run_dtype(checkpoint: Source, dtype: str) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    floats = Counter(info.dtype for info in checkpoint.tensors.values() if info.dtype.is_floating_point)
    return floats.most_common(1)[0][0] if floats else torch.float32  # as stored, as from_pretrained loads it


def default_activation_budget(stream: LayerStream, max_memory: int | None, batch_tokens: int) -> int:
    """What the activations may hold in memory: the budget left after the process as it stands, two
    layers (one running, one being read) and a batch's working memory."""
    text = stream.skeleton.model.config.get_text_config()
    width = max(text.hidden_size, getattr(text, "intermediate_size", None) or 4 * text.hidden_size)
    fixed = psutil.Process().memory_info().rss + 2 * stream.layer_bytes() + 4 * batch_tokens * width * 4
    if max_memory is None:
        return psutil.virtual_memory().available // 2
    if max_memory < fixed:
        raise PlanError(f"--max-memory {max_memory / 2**30:.2f} GiB is below what running this model takes: "
                        f"{fixed / 2**30:.2f} GiB (this process now, two layers of "
                        f"{stream.layer_bytes() / 2**30:.2f} GiB and a batch's working memory)")
    return max_memory - fixed


def _batches(windows: list[Window], batch_tokens: int) -> list[list[int]]:
    """Window indices grouped into batches of one length and at most ``batch_tokens`` tokens (at
    least one window)."""
    by_length: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_length.setdefault(len(w.ids), []).append(i)
    out = []
    for length, idx in by_length.items():
        size = max(1, batch_tokens // length)
        out += [idx[k:k + size] for k in range(0, len(idx), size)]
    return out


def score(stream: LayerStream, windows: list[Window], batch_tokens: int = BATCH_TOKENS) -> tuple[float, int]:
    """The summed NLL (nats, float64) of every window's scored positions, and their count."""
    groups = _batches(windows, batch_tokens)
    batches = [Batch(torch.stack([windows[i].ids for i in g])) for g in groups]
    positions, targets = [], []
    for g in groups:
        length = len(windows[g[0]].ids)
        pos = [j * length + torch.arange(windows[i].score_from - 1, length - 1) for j, i in enumerate(g)]
        positions.append(torch.cat(pos))
        targets.append(torch.cat([windows[i].ids[windows[i].score_from:] for i in g]))
    with stream.run(batches) as store:
        nll = VocabHead(stream).run(store, positions, targets).nll
    return sum(float(x.double().sum()) for x in nll), sum(len(t) for t in targets)


def _generate(stream: LayerStream, tokenizer: Any, prompts: list[str], max_new_tokens: int,
              progress: bool) -> list[Generation]:
    from tqdm import tqdm

    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if any(not e for e in encoded):
        raise DataError("a prompt tokenized to no tokens; give a non-empty --prompt")
    config = stream.skeleton.model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    pad = next(t for t in (tokenizer.pad_token_id, config.pad_token_id, *sorted(eos_ids), 0) if t is not None)
    with tqdm(total=max_new_tokens, desc="generating", unit="token", disable=not progress,
              leave=False) as bar:
        tokens = greedy(stream, encoded, max_new_tokens, eos_ids, pad, on_token=bar.update)
    return [Generation(p, tokenizer.decode(t, skip_special_tokens=True), t) for p, t in zip(prompts, tokens)]


def evaluate(model: str | Path, data: str | Path | list[str] | None = None, *, seqlen: int = 2048,
             samples: int | None = None, stride: int | None = None, text_field: str = "text",
             prompts: list[str] | tuple[str, ...] = (), max_new_tokens: int = 32, dtype: str = "auto",
             max_memory: int | None = None, trust_remote_code: bool = False, cache_dir: str | None = None,
             spill_dir: str | None = None, activation_budget: int | None = None,
             batch_tokens: int = BATCH_TOKENS, progress: bool = False) -> EvalResult:
    """Perplexity of ``model`` on ``data`` (a file, a dataset as ``name[:config]:split``, or a list of
    documents) under the protocol ``seqlen``/``stride``/``samples``, and greedy continuations of
    ``prompts``. ``activation_budget`` (bytes of activations kept in memory) overrides what
    ``max_memory`` leaves for them; ``batch_tokens`` is how many tokens run through a layer at once."""
    if data is None and not prompts:
        raise DataError("nothing to evaluate: give data to score (--data) or prompts to continue (--prompt)")
    protocol = Protocol(seqlen=seqlen, stride=stride, samples=samples)
    started = time.perf_counter()
    with PeakRss() as peak:
        model_dir, checkpoint = open_model(model, cache_dir)
        try:  # the architecture, tokenizer and data are checked before any layer is read
            stream = LayerStream(model_dir, checkpoint, dtype=_run_dtype(checkpoint, dtype),
                                 activation_budget=0, spill_dir=spill_dir, trust_remote_code=trust_remote_code)
            tokenizer = load_tokenizer(model_dir)
            windows: list[Window] = []
            if data is not None:
                documents = list(data) if isinstance(data, list) else read_documents(str(data), text_field)
                windows = cut_windows(tokenize(tokenizer, documents, protocol.join), protocol)
            stream.activation_budget = (activation_budget if activation_budget is not None
                                        else default_activation_budget(stream, max_memory, batch_tokens))
            stream.progress = progress
            total, count = score(stream, windows, batch_tokens) if windows else (0.0, 0)
            stream.progress = False  # generation shows one bar over its tokens instead
            generations = (_generate(stream, tokenizer, list(prompts), max_new_tokens, progress)
                           if prompts else [])
        finally:
            checkpoint.close()
    nll = total / count if count else None
    return EvalResult(
        model=str(model), perplexity=None if nll is None else math.exp(nll), nll=nll, tokens=count,
        windows=len(windows), seqlen=seqlen, seconds=time.perf_counter() - started, peak_rss_bytes=peak.bytes,
        protocol=protocol.as_dict(), dtype=str(stream.skeleton.dtype).removeprefix("torch."),
        spilled_bytes=stream.spilled_bytes, generations=generations)
