"""Kernels in isolation: exact k-th selection under any chunking, the counter-based generator."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge.methods.base import Chunk, TensorParams
from streammerge.methods.random import stream_key, uniform
from streammerge.methods.selection import top_k_mask, top_k_passes


def _chunks(x: torch.Tensor, rows_per_chunk: int, k: int) -> list[Chunk]:
    params = TensorParams({}, ({},))
    return [Chunk("w", tuple(x.shape), None, [x[s : s + rows_per_chunk]], params, s, min(s + rows_per_chunk, x.shape[0]), 0, (0,))
            for s in range(0, x.shape[0], rows_per_chunk)]


def _select(x: torch.Tensor, k: int, rows_per_chunk: int) -> torch.Tensor:
    """Run the selection passes the way the engine does, then the mask over each chunk."""
    passes = top_k_passes(lambda c, s: c.models, lambda c, s: [k], "sel")
    stats: dict = {}
    for p in passes:
        totals: dict = {}
        for c in _chunks(x, rows_per_chunk, k):
            for key, part in p.collect(c, stats).items():
                totals[key] = totals[key] + part if key in totals else part
        stats = p.finish(totals, c, stats)
    return torch.cat([top_k_mask(c.models[0], 0, c, stats, "sel") for c in _chunks(x, rows_per_chunk, k)])


values = st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0**-20, 3.0e-5, -7.25, 1e30]) | st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12), st.integers(1, 9), st.data())
def test_top_k_mask_is_exact_for_any_chunking(rows: int, cols: int, data: st.DataObject) -> None:
    flat = data.draw(st.lists(values, min_size=rows * cols, max_size=rows * cols))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    x = torch.tensor(flat, dtype=torch.float32).to(dtype).reshape(rows, cols)
    k = data.draw(st.integers(1, rows * cols))
    rows_per_chunk = data.draw(st.integers(1, rows))
    got = _select(x, k, rows_per_chunk).reshape(-1)
    order = torch.sort(-x.abs().float().reshape(-1), stable=True).indices  # largest first, ties by index
    want = torch.zeros(rows * cols, dtype=torch.bool)
    want[order[:k]] = True
    assert torch.equal(got, want)


def test_uniform_is_chunk_invariant_and_uniform() -> None:
    key = stream_key(42, "model.layers.0.mlp.up_proj.weight", 1)
    whole = uniform(key, 0, 200_000)
    parts = torch.cat([uniform(key, s, 7_000) for s in range(0, 200_000, 7_000)])[:200_000]
    assert torch.equal(whole, parts)
    assert whole.min() >= 0 and whole.max() < 1
    hist = torch.histc(whole, bins=10, min=0, max=1)
    assert ((hist - 20_000).abs() < 5 * 20_000**0.5).all()  # each decile within 5 sigma
    assert abs(torch.corrcoef(torch.stack([whole[:-1], whole[1:]]))[0, 1].item()) < 0.01


def test_streams_differ_by_seed_tensor_and_model() -> None:
    a = uniform(stream_key(1, "w", 0), 0, 1000)
    for other in (stream_key(2, "w", 0), stream_key(1, "v", 0), stream_key(1, "w", 1)):
        assert (uniform(other, 0, 1000) != a).float().mean() > 0.99
