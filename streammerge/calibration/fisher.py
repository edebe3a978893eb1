"""The empirical diagonal Fisher of every weight of a model, computed one layer at a time.

F = (1/S) Σ_s (∂ℓ_s/∂θ)², ℓ_s the mean next-token NLL of window s over its scored positions (as
``evaluate`` scores them): each window's own squared gradient, never the square of a batch's.
The model is never whole in memory; the backward is a reverse sweep over the layer stream:

1. forward: every window runs through the layer stream (one window a batch) and each layer's
   input of every window is kept, spilled to disk past the activation budget;
2. head: per window, the loss and its gradient by the last hidden states, through the final norm
   and the head read in vocabulary blocks (a log-sum-exp pass, then a pass with p - onehot); the
   head's squared gradient is added block by block;
3. sweep, layer L-1..0: the layer is loaded, each window's forward is recomputed from its stored
   input with autograd, the window's gradient by the layer's output is propagated through it; the
   parameters' squared gradients make the layer's Fisher, the input gradient goes to the layer below;
4. embedding: per window, the decoder's own prologue (Gemma's scale, GPT-2's learned positions) is
   differentiated by the window's embedding rows.

A tied head and embedding are one parameter: its Fisher is that of the sum of both gradients,
Σ_s (h_s + e_s)², with h_s the head's gradient (every row) and e_s the embedding's (the rows window s
uses): Σ_s h_s² is added in the head pass, and e_s(2h_s + e_s) at the used rows at the end, from
h_s's used rows kept per window. The embedding's gradient at its ``padding_idx`` row is zero, as
``nn.Embedding`` defines it. Fused parameters in memory (Mixtral's ``experts.gate_up_proj``) are
split back into the checkpoint's tensors by transformers' reverse conversion, the one
``save_pretrained`` uses: it only moves elements, so each squared gradient lands on its weight.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn

from streammerge.errors import CheckpointError, DataError
from streammerge.evaluation.windows import Window
from streammerge.forward import Batch, LayerStream, VocabHead
from streammerge.forward.activations import ActivationStore
from streammerge.forward.head import _LOGITS

Stats = dict[str, dict[str, torch.Tensor]]


def fisher_stats(stream: LayerStream, windows: list[Window]) -> Iterator[tuple[int, Stats]]:
    """``(i, {checkpoint weight name: {"fisher": F}})`` for each decoder layer ``i`` from the last
    to the first, then ``(-1, ...)`` for every weight outside the layers (embedding, head unless
    tied, final norm, learned positions). Each F is float32, the shape of the checkpoint tensor.
    Nothing yielded is referenced here afterwards: write each as it comes and drop it. Half the
    stream's activation budget holds layer inputs and gradients in memory, the rest is spilled."""
    if not windows:
        raise DataError("no calibration windows: the Fisher needs at least one window of text")
    sweep = _Sweep(stream, windows, stream.activation_budget // 2)
    try:
        sweep.forward()
        yield from sweep.layers()
        yield -1, sweep.outside()
    finally:
        stream.spilled_bytes = max(stream.spilled_bytes, sweep.store.spilled_bytes)
        sweep.close()


@contextlib.contextmanager
def _inputs_kept(layer: nn.Module, put: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Hands each batch's input of ``layer`` to ``put(batch index, hidden states)`` as it runs."""
    count = itertools.count()

    def pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        put(next(count), args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _Sweep:
    """One Fisher computation: the kept activations and gradients, and the passes over them."""

    def __init__(self, stream: LayerStream, windows: list[Window], kept: int):
        self.stream, self.windows, self.skel = stream, windows, stream.skeleton
        self.n = len(windows)
        # sums of squares: float32, float64 for a float64 run
        self.acc = torch.promote_types(self.skel.dtype, torch.float32)
        weights = stream.weights
        self.tied = weights.head_key == weights.embedding_key
        # One store, so that one budget bounds all of it (the layer stream's own store gets the
        # rest of the activation budget while the forward runs). Keys: layer i's input of window s at
        # i * n + s; window s's gradient by the current boundary at _grad + s; the head pass's
        # gradients of the resident weights and of the tied rows used at _carry + s; the head's
        # sum of squares at _held.
        self.store = ActivationStore(kept, stream.spill_dir)
        layers = stream.layer_count * self.n
        self._grad, self._carry, self._held = layers, layers + self.n, layers + 2 * self.n
        embedding, head = self.skel.embedding.weight, self.skel.head.weight
        model_names = weights._model_names(weights.resident_keys)
        by_model = {name: key for key, name in model_names.items()}
        self.resident = [(by_model[name], p) for name, p in self.skel.model.named_parameters()
                         if p is not embedding and p is not head and name in by_model]
        self._flags = [p.requires_grad for _, p in self.resident]
        for _, p in self.resident:
            p.requires_grad_(True)
        self.calls: dict[int, list] = {}  # window length -> the recorded calls of every layer

    def close(self) -> None:
        self.store.close()
        for (_, p), flag in zip(self.resident, self._flags):
            p.requires_grad_(flag)

    def _rows(self, ids: torch.Tensor, grad: bool) -> nn.Parameter:
        """The embedding rows of ``torch.unique(ids)``, a parameter for ``LayerStream.prepare``."""
        weights = self.stream.weights
        return nn.Parameter(weights.rows(weights.embedding_key, torch.unique(ids)), requires_grad=grad)

    # -- forward and head ---------------------------------------------------------------------

    def forward(self) -> None:
        for w in self.windows:
            if len(w.ids) not in self.calls:  # given rows: ordinary tensors, which autograd can save
                with torch.no_grad():
                    rows = self._rows(w.ids, False)
                    self.calls[len(w.ids)] = self.stream.prepare(Batch(w.ids[None]), rows=rows)[1]
        batches = [Batch(w.ids[None]) for w in self.windows]

        def keep(i: int, layer: nn.Module) -> contextlib.AbstractContextManager:
            return _inputs_kept(layer, lambda s, x: self.store.put(i * self.n + s, x))

        budget = self.stream.activation_budget
        self.stream.activation_budget = budget - self.store.budget
        try:
            last = self.stream.run(batches, hook=keep)
        finally:
            self.stream.activation_budget = budget
        with last:
            head = VocabHead(self.stream)
            squares = torch.zeros(head.vocab, head.width, dtype=self.acc)
            for s in range(self.n):
                self._head(head, s, last.get(s), squares)
        self.store.put(self._held, squares)

    def _logsumexp(self, head: VocabHead, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        checkpoint = self.stream.weights.checkpoint
        lse = torch.full((len(x),), -torch.inf)
        with torch.no_grad():
            for start in range(0, head.vocab, head.block):
                stop = min(start + head.block, head.vocab)
                weight = checkpoint.read(head.key, slice(start, stop)).to(self.skel.dtype)
                rows = max(1, _LOGITS // (stop - start))
                for t in range(0, len(x), rows):
                    logits = head._logits(x[t:t + rows], weight, None if bias is None else bias[start:stop])
                    lse[t:t + rows] = torch.logaddexp(lse[t:t + rows], torch.logsumexp(logits, dim=1))
        return lse

    def _head(self, head: VocabHead, s: int, hidden: torch.Tensor, squares: torch.Tensor) -> None:
        """Window ``s``'s loss gradient by the last layer's output (stored at ``_grad + s``), by the
        head (its square added to ``squares``) and by the resident weights, the final norm's and the
        head's bias, with the tied rows the window uses (stored at ``_carry + s``)."""
        w, skel = self.windows[s], self.skel
        pos, target = torch.arange(w.score_from - 1, len(w.ids) - 1), w.ids[w.score_from:]
        hidden = hidden.clone().requires_grad_(True)  # [1, L, H]
        with torch.enable_grad():
            normed = skel.norm(hidden[0, pos])
        x = normed.detach()
        bias = getattr(skel.head, "bias", None)
        lse = self._logsumexp(head, x, bias)
        dx = torch.zeros(x.shape, dtype=self.acc)
        dbias = None if bias is None else torch.zeros(bias.shape, dtype=self.acc)
        used = torch.unique(w.ids)
        tied_rows = torch.zeros(len(used) if self.tied else 0, head.width, dtype=self.acc)
        checkpoint = self.stream.weights.checkpoint
        for start in range(0, head.vocab, head.block):
            stop = min(start + head.block, head.vocab)
            weight = checkpoint.read(head.key, slice(start, stop)).to(skel.dtype).requires_grad_(True)
            dweight = torch.zeros(weight.shape, dtype=self.acc)
            rows = max(1, _LOGITS // (stop - start))
            for t in range(0, len(x), rows):
                xt = x[t:t + rows].clone().requires_grad_(True)
                with torch.enable_grad():
                    logits = head._logits(xt, weight, None if bias is None else bias[start:stop])
                # dℓ/dlogits = (softmax - onehot(target)) / scored positions
                coeff = torch.exp(logits.detach() - lse[t:t + rows, None])
                tgt = target[t:t + rows]
                hit = torch.nonzero((tgt >= start) & (tgt < stop)).flatten()
                coeff[hit, tgt[hit] - start] -= 1
                coeff /= len(pos)
                inputs = [xt, weight] + ([] if bias is None else [bias])
                got = torch.autograd.grad(logits, inputs, coeff)
                dx[t:t + rows] += got[0]
                dweight += got[1]
                if bias is not None:
                    dbias += got[2]
            squares[start:stop].addcmul_(dweight, dweight)
            if self.tied:
                inside = (used >= start) & (used < stop)
                tied_rows[inside] = dweight[used[inside] - start]
            del weight
        checkpoint.release(head.key)
        params = [p for _, p in self.resident]
        got = torch.autograd.grad(normed, [hidden, *params], dx.to(normed.dtype), allow_unused=True)
        self.store.put(self._grad + s, got[0])
        carried = [torch.zeros(p.shape, dtype=self.acc) if g is None else g.to(self.acc)
                   for p, g in zip(params, got[1:])]
        if bias is not None:
            carried[next(k for k, p in enumerate(params) if p is bias)] += dbias
        self.store.put(self._carry + s, torch.cat([c.flatten() for c in [*carried, tied_rows]]))

    # -- the reverse sweep ----------------------------------------------------------------------

    def layers(self) -> Iterator[tuple[int, Stats]]:
        for i in reversed(range(self.stream.layer_count)):
            yield i, self._layer_stats(i)  # built in a call, so no local here keeps it alive

    def _layer_stats(self, i: int) -> Stats:
        weights, layer = self.stream.weights, self.skel.layers[i]
        prefix = next(name for name, m in self.skel.model.named_modules() if m is layer)
        weights.load(weights.read(weights.layer_keys[i]), [layer], f"layer {i}")
        try:
            params = [(f"{prefix}.{n}", p) for n, p in layer.named_parameters()]
            squares = self._layer(i, layer, [p for _, p in params])
        finally:
            weights.release(i)
        return self._stats(weights.layer_keys[i], {name: sq for (name, _), sq in zip(params, squares)})

    def _layer(self, i: int, layer: nn.Module, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """The layer's sums of squared per-window gradients. A hook squares each parameter's
        gradient into its accumulator as the backward produces it and drops it, so the layer's
        gradients never exist all at once (404 MiB of a 7B layer in bfloat16)."""
        squares = [torch.zeros(p.shape, dtype=self.acc) for p in params]

        def squaring(sq: torch.Tensor) -> Callable[[nn.Parameter], None]:
            def hook(p: nn.Parameter) -> None:
                sq.addcmul_(p.grad, p.grad)  # squared in the accumulator's precision
                p.grad = None
            return hook

        handles = []
        for p, sq in zip(params, squares):
            p.requires_grad_(True)
            p.grad = None
            # a parameter no token reached (an expert never routed to) gets no call
            handles.append(p.register_post_accumulate_grad_hook(squaring(sq)))
        try:
            for s, w in enumerate(self.windows):
                call = self.calls[len(w.ids)][i]
                x = self.store.get(i * self.n + s).clone().requires_grad_(True)
                with torch.enable_grad():
                    out = layer(x, *call.args, **call.kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    torch.autograd.backward(out, self.store.get(self._grad + s))
                self.store.put(self._grad + s, x.grad)
        finally:
            for h in handles:
                h.remove()
        return squares

    def _stats(self, keys: list[str], squares: dict[str, torch.Tensor]) -> Stats:
        """Sums of squares by model parameter name -> Fisher by checkpoint tensor name."""
        info = self.stream.weights.checkpoint.tensors
        owners: dict[str, list[str]] = defaultdict(list)
        for key, name in self.stream.weights._model_names(keys).items():
            owners[name].append(key)
        out, fused = {}, {}
        for name, sq in squares.items():
            found = owners.get(name, [])
            if len(found) == 1 and tuple(info[found[0]].shape) == tuple(sq.shape):
                out[found[0]] = sq
            else:
                fused[name] = sq
        if fused:
            from transformers.core_model_loading import revert_weight_conversion

            for key, sq in revert_weight_conversion(self.skel.model, fused).items():
                if key not in info or tuple(info[key].shape) != tuple(sq.shape):
                    raise CheckpointError(
                        f"{self.stream.weights.checkpoint.path}: the Fisher of the fused parameters "
                        f"{sorted(fused)} maps back to {key!r} {tuple(sq.shape)}, not a tensor of the "
                        "checkpoint; this architecture's Fisher cannot be stored by checkpoint name")
                out[key] = sq
        return {key: {"fisher": sq.div_(self.n).float()} for key, sq in out.items()}

    # -- the embedding and everything outside the layers -------------------------------------------

    def outside(self) -> Stats:
        weights = self.stream.weights
        head_squares = self.store.get(self._held)
        pad = getattr(self.skel.embedding, "padding_idx", None)
        vocab, width = weights.checkpoint.tensors[weights.embedding_key].shape
        embedding = head_squares if self.tied else torch.zeros(vocab, width, dtype=self.acc)
        resident = [torch.zeros(p.shape, dtype=self.acc) for _, p in self.resident]
        sizes = [p.numel() for _, p in self.resident]
        for s, w in enumerate(self.windows):
            rows = self._rows(w.ids, True)
            with torch.enable_grad():
                embedded, _ = self.stream.prepare(Batch(w.ids[None]), upto=0, rows=rows)
            got = torch.autograd.grad(embedded, [rows, *(p for _, p in self.resident)],
                                      self.store.get(self._grad + s), allow_unused=True)
            used = torch.unique(w.ids)
            e = got[0].to(self.acc)
            if pad is not None:
                e[used == pad] = 0  # nn.Embedding gives its padding row no gradient
            carried = self.store.get(self._carry + s).split([*sizes, e.numel() if self.tied else 0])
            if self.tied:  # (h + e)² - h² at the used rows; h² is in already
                h = carried[-1].view_as(e)
                embedding.index_add_(0, used, e * (2 * h + e))
            else:
                embedding.index_add_(0, used, e * e)
            for total, c, g, (_, p) in zip(resident, carried, got[1:], self.resident):
                total += (c.view(p.shape) if g is None else c.view(p.shape) + g.to(self.acc)).square()
        stats = {weights.embedding_key: {"fisher": embedding.div_(self.n).float()}}
        if not self.tied:
            stats[weights.head_key] = {"fisher": head_squares.div_(self.n).float()}
        for (key, _), total in zip(self.resident, resident):
            stats[key] = {"fisher": total.div_(self.n).float()}
        return stats
