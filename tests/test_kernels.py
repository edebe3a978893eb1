"""Kernels in isolation: exact k-th selection under any chunking, the counter-based generator, float-bit masks
and TIES's consensus merge."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge.methods import bitpack, float_bits, get_method
from streammerge.methods.base import Chunk, TensorParams, run_passes
from streammerge.methods.random import Stream
from streammerge.methods import selection
from streammerge.methods.selection import top_k_mask, top_k_passes


def _chunks(x: torch.Tensor, rows_per_chunk: int, k: int) -> list[Chunk]:
    params = TensorParams({}, ({},))
    return [Chunk("w", tuple(x.shape), None, [x[s : s + rows_per_chunk]], params, s, min(s + rows_per_chunk, x.shape[0]), 0, (0,))
            for s in range(0, x.shape[0], rows_per_chunk)]


def _select(x: torch.Tensor, k: int, rows_per_chunk: int, elementwise: bool = False) -> torch.Tensor:
    """Run the selection passes the way the engine does, then the mask over each chunk."""
    passes = top_k_passes(lambda c, s: c.models, lambda c, s: [k], "sel", elementwise=elementwise)
    stats = run_passes(passes, lambda: _chunks(x, rows_per_chunk, k))
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
        got = _select(x, k, rows_per_chunk, elementwise=data.draw(st.booleans())).reshape(-1)
    assert torch.equal(got, _reference_top_k(x, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
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


def test_bfloat16_keys_are_counted_exactly_in_one_pass() -> None:
    """The sample that misleads the 32-bit path does not matter: every 16-bit key is counted."""
    x = torch.linspace(1e-3, 2e-3, 4000).reshape(40, 100)
    x.view(-1)[::7] += 10.0
    x = x.to(torch.bfloat16)
    with _sample_size(1000):
        passes = top_k_passes(lambda c, s: c.models, lambda c, s: [2000], "sel", elementwise=True)
        stats = run_passes(passes[:1], lambda: _chunks(x, 7, 2000))
        got = torch.cat([top_k_mask(c.models[0], 0, c, stats, "sel") for c in _chunks(x, 7, 2000)]).reshape(-1)
    assert torch.equal(got, _reference_top_k(x, 2000))


def _murmur_draw(key: int, i: int) -> int:
    """Independent reference: murmur3's fmix32 of i·0x9E3779B9 + key mod 2³², in Python integers."""
    x = (i * 0x9E3779B9 + key) % 2**32
    x ^= x >> 16
    x = x * 0x85EBCA6B % 2**32
    x ^= x >> 13
    x = x * 0xC2B2AE35 % 2**32
    return x ^ (x >> 16)


def test_stream_draws_are_murmur3_on_a_weyl_sequence_keyed_per_2_32_block() -> None:
    s = Stream(42, "model.layers.0.mlp.up_proj.weight", 1)
    for start in (0, 2**31 - 3, 2**32 - 4, 3 * 2**32 + 5):
        got = s.bits(start, 8).tolist()
        want = []
        for i in range(start, start + 8):
            x = _murmur_draw(s._key(i >> 32), i % 2**32)
            want.append(x - 2**32 if x >= 2**31 else x)
        assert got == want, start
    assert s._key(0) != s._key(1)  # the sequence does not repeat after 2³² elements


def test_uniform_is_chunk_invariant_and_uniform() -> None:
    s = Stream(42, "model.layers.0.mlp.up_proj.weight", 1)
    whole = s.uniform(0, 200_000)
    parts = torch.cat([s.uniform(start, 7_000) for start in range(0, 200_000, 7_000)])[:200_000]
    assert torch.equal(whole, parts)
    assert whole.min() >= 0 and whole.max() < 1
    hist = torch.histc(whole, bins=10, min=0, max=1)
    assert ((hist - 20_000).abs() < 5 * 20_000**0.5).all()  # each decile within 5 sigma
    assert abs(torch.corrcoef(torch.stack([whole[:-1], whole[1:]]))[0, 1].item()) < 0.01


def test_draws_do_not_depend_on_how_a_range_is_split_into_pieces() -> None:
    """One call spanning several CPU pieces and a key block boundary equals many small calls."""
    s = Stream(5, "model.embed_tokens.weight", 2)
    start, count, step = 2**32 - 1_300_000, 2_600_000, 100_003
    parts = range(start, start + count, step)
    assert torch.equal(s.bits(start, count), torch.cat([s.bits(a, min(step, start + count - a)) for a in parts]))
    assert torch.equal(s.below(0.3, start, count), torch.cat([s.below(0.3, a, min(step, start + count - a)) for a in parts]))


def test_streams_differ_by_seed_tensor_and_model() -> None:
    a = Stream(1, "w", 0).uniform(0, 1000)
    for other in (Stream(2, "w", 0), Stream(1, "v", 0), Stream(1, "w", 1)):
        assert (other.uniform(0, 1000) != a).float().mean() > 0.99


@settings(max_examples=60, deadline=None)
@given(p=st.one_of(st.floats(0.0, 1.0), st.integers(0, 2**24).map(lambda k: k / 2**24), st.sampled_from([0.1, 0.7, 0.9])),
       start=st.integers(0, 2**33), count=st.integers(1, 3000))
def test_below_is_the_exact_comparison_of_the_uniforms(p: float, start: int, count: int) -> None:
    s = Stream(3, "t", 2)
    assert torch.equal(s.below(p, start, count), s.uniform(start, count).double() < p)


floats = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0**-130, -(2.0**-140), 3.0e-5, float("inf"), -float("inf")]) | st.floats(-1e4, 1e4, width=32)
float_dtypes = st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(floats, floats, st.booleans()), min_size=1, max_size=40), float_dtypes, floats)
def test_float_bit_masks_match_their_float_definitions(items: list, dtype: torch.dtype, value: float) -> None:
    x = torch.tensor([a for a, _, _ in items], dtype=torch.float64).to(dtype)
    y = torch.tensor([b for _, b, _ in items], dtype=torch.float64).to(dtype)
    keep = torch.tensor([k for _, _, k in items])
    m = float_bits.mask(keep, dtype)
    assert torch.equal(float_bits.bits(float_bits.select_(x.clone(), m)), float_bits.bits(torch.where(keep, x, torch.zeros((), dtype=dtype))))
    assert torch.equal(float_bits.constant_(value, m.clone(), dtype), torch.where(keep, torch.tensor(value, dtype=dtype), torch.zeros((), dtype=dtype)))
    assert torch.equal(float_bits.nonzero(x) != 0, x != 0)
    assert torch.equal(float_bits.agrees(x, y) != 0, (torch.signbit(x) == torch.signbit(y)) & (x != 0))
    assert torch.equal(float_bits.where_zero(x, value), torch.where(x == 0, torch.tensor(value, dtype=dtype), x))
    for op in (torch.lt, torch.ge, torch.gt, torch.eq):
        assert torch.equal(float_bits.compare(op, float_bits.bits(x), 7), op(float_bits.bits(x), 7))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 50).flatmap(lambda k: st.lists(st.booleans(), min_size=8 * k, max_size=8 * k)))
def test_bitpack_puts_element_j_n_8_plus_r_in_bit_j_of_byte_r(bits: list[bool]) -> None:
    keep = torch.tensor(bits)
    n = len(bits)
    packed = bitpack.pack(keep)
    want = [sum(1 << j for j in range(8) if bits[j * n // 8 + r]) for r in range(n // 8)]
    assert packed.dtype == torch.uint8 and packed.tolist() == want
    assert torch.equal(bitpack.unpack(packed, (2, n // 2) if n % 2 == 0 else (n,)).flatten(), keep)


def _mergekit_consensus(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """mergekit 0.1.5's generalized task arithmetic after sparsification, op for op in the working dtype."""
    d = torch.stack(deltas)
    w = torch.tensor(weights, dtype=d.dtype).view(-1, *[1] * base.dim())
    weighted = d * w
    elected = (weighted.sum(0) >= 0).to(d.dtype) * 2 - 1
    mask = (weighted.sign() == elected).to(d.dtype)
    mixed = (weighted * mask).sum(0)
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    return base + (mixed / divisor if normalize else mixed)


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 5), st.integers(1, 10).map(lambda k: 32 * k), st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), st.booleans(), st.data())
def test_consensus_merge_matches_mergekit_op_order_bit_for_bit(n: int, size: int, dtype: torch.dtype, normalize: bool,
                                                               data: st.DataObject) -> None:
    """Per-model products and sign-bit masks round exactly as mergekit's stacked tensors do; small
    integers make exact ties, zero sums and zero deltas common. (Sizes are multiples of 32, as rows
    of real weights are: there torch sums a stack over dim 0 in order, as ``sum_models`` does; on
    other sizes its order varies with the shape.)"""
    seed = data.draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    small = data.draw(st.booleans())
    base = torch.randn(size, generator=g, dtype=torch.float64).to(dtype)
    xs = [(base.double() + (torch.randint(-2, 3, (size,), generator=g) if small else torch.randn(size, generator=g))).to(dtype)
          for _ in range(n)]
    weights = data.draw(st.lists(st.sampled_from([1.0, 0.5, 0.3, -0.7, 1 / 3]), min_size=n, max_size=n))
    params = TensorParams({"normalize": normalize, "rescale": False, "lambda": 1.0, "int8_mask": False},
                          tuple({"weight": w, "density": 1.0} for w in weights))
    chunk = Chunk("w", (size,), base, xs, params, 0, size, 0, tuple(range(1, n + 1)))
    got = get_method("ties").merge(chunk, {})
    want = _mergekit_consensus(base, [x - base for x in xs], weights, normalize)
    assert torch.equal(got, want)
