"""The final norm and output head, run in vocabulary and token chunks.

A 128k-token vocabulary's head is 1 GiB in bf16 and its logits for 2048 tokens are 1 GiB in
float32, so neither is ever whole: the head is read a block of rows at a time, each block's logits
are computed for a block of tokens, and a running log-sum-exp, the targets' logits and a running
argmax are kept per token. Logits are computed in the run's dtype and widened to float32 before
the softmax, as transformers' loss does, so the numbers match a whole-model forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streammerge.forward.activations import ActivationStore
from streammerge.forward.stream import LayerStream

_BLOCK_BYTES = 64 << 20  # head rows read at once
_LOGITS = 8 << 20  # logits computed at once (elements): 32 MiB in float32


@dataclass
class HeadOutput:
    """Per batch, per picked position: the target's negative log-likelihood (when targets were
    given) and the most likely next token."""

    nll: list[torch.Tensor] | None
    argmax: list[torch.Tensor]


class VocabHead:
    def __init__(self, stream: LayerStream):
        self.stream = stream
        skel = stream.skeleton
        self.key = stream.weights.head_key
        self.vocab, self.width = stream.weights.checkpoint.tensors[self.key].shape
        self.block = max(1, _BLOCK_BYTES // (self.width * skel.dtype.itemsize))

    def run(self, store: ActivationStore, positions: list[torch.Tensor],
            targets: list[torch.Tensor] | None = None) -> HeadOutput:
        """Score, for batch ``b``, its flattened positions ``positions[b]`` (their next-token
        predictions) against ``targets[b]``. The store's entries are replaced by normed rows."""
        skel = self.stream.skeleton
        with torch.inference_mode():
            for b, pos in enumerate(positions):
                hidden = store.get(b)
                store.put(b, skel.norm(hidden.reshape(-1, hidden.shape[-1])[pos]))
        count = [len(p) for p in positions]
        top = [torch.full((n,), -torch.inf) for n in count]
        total = [torch.zeros(n) for n in count]
        best = [torch.full((n,), -torch.inf) for n in count]
        arg = [torch.zeros(n, dtype=torch.long) for n in count]
        chosen = [torch.zeros(n) for n in count]
        bias = getattr(skel.head, "bias", None)
        checkpoint = self.stream.weights.checkpoint
        with torch.inference_mode():
            for start in range(0, self.vocab, self.block):
                stop = min(start + self.block, self.vocab)
                weight = checkpoint.read(self.key, slice(start, stop)).to(skel.dtype)
                rows = max(1, _LOGITS // (stop - start))
                for b in range(len(positions)):
                    x = store.get(b)
                    for t in range(0, count[b], rows):
                        block_bias = None if bias is None else bias[start:stop]
                        logits = self._logits(x[t:t + rows], weight, block_bias)
                        span = slice(t, t + len(logits))
                        values, where = logits.max(dim=1)
                        peak = torch.maximum(top[b][span], values)
                        total[b][span] = total[b][span] * torch.exp(top[b][span] - peak) + torch.exp(
                            logits - peak[:, None]).sum(dim=1)
                        top[b][span] = peak
                        better = values > best[b][span]  # strict: the first maximum wins, as argmax's
                        best[b][span] = torch.where(better, values, best[b][span])
                        arg[b][span] = torch.where(better, where + start, arg[b][span])
                        if targets is not None:
                            tgt = targets[b][span]
                            inside = (tgt >= start) & (tgt < stop)
                            local = (tgt - start).clamp(0, stop - start - 1)
                            picked = logits.gather(1, local[:, None]).squeeze(1)
                            chosen[b][span] = torch.where(inside, picked, chosen[b][span])
                del weight
        checkpoint.release(self.key)
        nll = None if targets is None else [t + torch.log(s) - c for t, s, c in zip(top, total, chosen)]
        return HeadOutput(nll, arg)

    def _logits(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        logits = F.linear(x, weight, bias)
        cap = self.stream.skeleton.softcap
        if cap is not None:  # Gemma 2's CausalLM head, in the model's dtype as there
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
