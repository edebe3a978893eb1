"""Kernels in isolation: exact k-th selection under any chunking, the counter-based generator."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge.methods.base import Chunk, TensorParams, run_passes
from streammerge.methods.random import stream_key, uniform
from streammerge.methods import selection
from streammerge.methods.selection import top_k_mask, top_k_passes


def _chunks(x: torch.Tensor, rows_per_chunk: int, k: int) -> list[Chunk]:
    params = TensorParams({}, ({},))
    return [Chunk("w", tuple(x.shape), None, [x[s : s + rows_per_chunk]], params, s, min(s + rows_per_chunk, x.shape[0]), 0, (0,))
            for s in range(0, x.shape[0], rows_per_chunk)]


def _select(x: torch.Tensor, k: int, rows_per_chunk: int) -> torch.Tensor:
    """Run the selection passes the way the engine does, then the mask over each chunk."""
    stats = run_passes(top_k_passes(lambda c, s: c.models, lambda c, s: [k], "sel"), lambda: _chunks(x, rows_per_chunk, k))
    return torch.cat([top_k_mask(c.models[0], 0, c, stats, "sel") for c in _chunks(x, rows_per_chunk, k)])


values = st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0**-20, 3.0e-5, -7.25, 1e30]) | st.floats(-10, 10, allow_nan=False, width=32)


def _reference_top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(-x.abs().float().reshape(-1), stable=True).indices  # largest first, ties by index
    want = torch.zeros(x.numel(), dtype=torch.bool)
    want[order[:k]] = True
    return want


@contextmanager
def _sample_size(n: int) -> Iterator[None]:
    """A small sample, so that tiny tensors take the sampled band and its fallback, not an exhaustive sample."""
    saved, selection.SAMPLE_SIZE = selection.SAMPLE_SIZE, n
    try:
        yield
    finally:
        selection.SAMPLE_SIZE = saved


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.integers(1, 9), st.data())
def test_top_k_mask_is_exact_for_any_chunking(rows: int, cols: int, data: st.DataObject) -> None:
    flat = data.draw(st.lists(values, min_size=rows * cols, max_size=rows * cols))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    x = torch.tensor(flat, dtype=torch.float32).to(dtype).reshape(rows, cols)
    k = data.draw(st.integers(1, rows * cols))
    rows_per_chunk = data.draw(st.integers(1, rows))
    with _sample_size(data.draw(st.sampled_from([1 << 18, 2, 5, 16]))):
        got = _select(x, k, rows_per_chunk).reshape(-1)
    assert torch.equal(got, _reference_top_k(x, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_misleading_sample_falls_back_to_the_exact_radix_select(dtype: torch.dtype) -> None:
    """Every sampled element (flat index ≡ 0 mod the stride) is large, the rest small: the sample's band
    misses the k-th largest, and the radix passes must still find it exactly."""
    x = torch.linspace(1e-3, 2e-3, 4000).reshape(40, 100)
    x.view(-1)[::7] += 10.0  # the sample's stride: 4000 // 1000, moved up to 7, the next coprime with 100
    x = x.to(dtype)
    with _sample_size(1000):
        assert selection._stride(_chunks(x, 7, 2000)[0]) == 7
        missed = run_passes(top_k_passes(lambda c, s: c.models, lambda c, s: [2000], "sel")[:2], lambda: _chunks(x, 7, 2000))
        assert missed["sel"]["found"] == ["missed"]
        stats = run_passes(top_k_passes(lambda c, s: c.models, lambda c, s: [2000], "sel"), lambda: _chunks(x, 7, 2000))
        assert stats["sel"]["found"][0] != "missed"
        got = torch.cat([top_k_mask(c.models[0], 0, c, stats, "sel") for c in _chunks(x, 7, 2000)]).reshape(-1)
    assert torch.equal(got, _reference_top_k(x, 2000))


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
