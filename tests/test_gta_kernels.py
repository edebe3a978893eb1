"""The compiled task-arithmetic kernels (``gta_kernels``) against the torch path, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streammerge.methods import get_method, gta_kernels
from streammerge.methods.base import Chunk, TensorParams, run_passes

pytestmark = pytest.mark.skipif(
    gta_kernels.unavailable() is not None,
    reason=f"compiled kernels unavailable: {gta_kernels.unavailable()}",
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
METHODS = ["ties", "dare_ties", "dare_linear", "task_arithmetic"]
# magnitudes from subnormal to near float16's largest, zeros of both signs
SPECIAL = [0.0, -0.0, 1e-7, -3e-8, 6e-5, 1.0, -2.5, 65000.0, -60000.0, 1e-3]


def _merge(
    method: str,
    base: torch.Tensor,
    models: list[torch.Tensor],
    per_model: list[dict],
    glob: dict,
    rows_per_chunk: int,
    kernels: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> torch.Tensor:
    """The method over row chunks, as the engine runs it, with the compiled kernels or without."""
    with monkeypatch.context() as m:
        if not kernels:
            m.setattr(gta_kernels, "supports", lambda x: False)
        spec = get_method(method)
        defaults = {p.name: p.default for p in spec.params if not p.per_model}
        per = tuple({**{p.name: p.default for p in spec.params if p.per_model}, **pm} for pm in per_model)
        params = TensorParams({**defaults, **glob}, per)
        rows = base.shape[0]

        def chunks() -> list[Chunk]:
            return [
                Chunk(
                    "w",
                    tuple(base.shape),
                    base[s : s + rows_per_chunk],
                    [x[s : s + rows_per_chunk] for x in models],
                    params,
                    s,
                    min(s + rows_per_chunk, rows),
                    11,
                    tuple(range(len(models))),
                )
                for s in range(0, rows, rows_per_chunk)
            ]

        stats = run_passes(spec.passes_for(params), chunks)
        return torch.cat([spec.merge(c, stats) for c in chunks()])


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.element_size() == 4 else torch.int16)


values = st.sampled_from(SPECIAL) | st.floats(-4, 4, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(METHODS),
    st.sampled_from(DTYPES),
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(1, 40),
    st.data(),
)
def test_kernels_merge_the_same_bits_as_the_torch_path(
    method: str, dtype: torch.dtype, n: int, rows: int, cols: int, data: st.DataObject
) -> None:
    monkeypatch = pytest.MonkeyPatch()
    numel = rows * cols
    base = torch.tensor(data.draw(st.lists(values, min_size=numel, max_size=numel)), dtype=torch.float32)
    models = []
    for _ in range(n):
        noise = torch.tensor(
            data.draw(st.lists(values, min_size=numel, max_size=numel)), dtype=torch.float32
        )
        scale = data.draw(st.sampled_from([1.0, 1e-2, 1e-4]))
        models.append((base + noise * scale).to(dtype).reshape(rows, cols))
    base = base.to(dtype).reshape(rows, cols)
    weight = st.sampled_from([1.0, 0.5, -0.3, 0.0, 1.7, 1 / 3]) | st.floats(-2, 2, allow_nan=False)
    per_model = [{"weight": data.draw(weight)} for _ in range(n)]
    glob = {"lambda": data.draw(st.sampled_from([1.0, 0.7, 2.0]))}
    if method != "task_arithmetic":
        for p in per_model:
            p["density"] = data.draw(st.sampled_from([1.0, 0.5, 0.2, 0.9]))
    if method != "dare_linear":
        glob["normalize"] = data.draw(st.booleans())
    if method.startswith("dare"):
        glob["rescale"] = data.draw(st.booleans())
    rows_per_chunk = data.draw(st.integers(1, rows))
    want = _merge(method, base, models, per_model, glob, rows_per_chunk, False, monkeypatch)
    got = _merge(method, base, models, per_model, glob, rows_per_chunk, True, monkeypatch)
    assert torch.equal(_bits(got), _bits(want))


def test_every_finite_half_and_bfloat16_round_trips_through_the_kernel() -> None:
    """B = 0, one model of weight 1: out = x for every finite value of the 16-bit types."""
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
        x = x[torch.isfinite(x)]
        out = gta_kernels.merge(
            torch.zeros_like(x), [x], [gta_kernels.Keep()], [1.0], [1.0], False, False, 0.0, 1.0
        )
        want = x + 0  # -0 - 0 is +0 in torch too
        assert torch.equal(_bits(out), _bits(want))


@pytest.mark.parametrize("dtype", DTYPES)
def test_products_round_like_torch_across_the_whole_range(dtype: torch.dtype) -> None:
    """x·w for random 16-bit patterns (subnormals and overflow included) and awkward weights."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(1 << 15), 1 << 15, (1 << 16,), generator=g, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.float16).float() if dtype != torch.bfloat16 else bits.view(torch.bfloat16).float()
    x = x[torch.isfinite(x)].to(dtype)
    for w in (0.1, 3.0, -1 / 3, 1e-3, 7.5e3):
        wr = torch.tensor(w, dtype=dtype).item()
        out = gta_kernels.merge(
            torch.zeros_like(x), [x], [gta_kernels.Keep()], [1.0], [wr], False, False, 0.0, 1.0
        )
        want = (x * wr) + 0
        finite = torch.isfinite(want)
        if out is None:  # an overflow to infinity is handed back to the torch path
            assert not bool(finite.all())
            continue
        assert torch.equal(_bits(out), _bits(want))


def test_a_chunk_with_infinity_is_handed_back_and_merged_by_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    base = torch.zeros(4, 8, dtype=torch.bfloat16)
    x = torch.full((4, 8), 0.5, dtype=torch.bfloat16)
    x[1, 3] = float("inf")
    assert (
        gta_kernels.merge(
            base.reshape(-1), [x.reshape(-1)], [gta_kernels.Keep()], [1.0], [1.0], True, True, 0.0, 1.0
        )
        is None
    )
    per_model, glob = [{"weight": 1.0, "density": 1.0}], {}
    want = _merge("ties", base, [x], per_model, glob, 4, False, monkeypatch)
    got = _merge("ties", base, [x], per_model, glob, 2, True, monkeypatch)
    assert torch.equal(_bits(got), _bits(want))


def test_without_a_compiler_the_reason_is_named_and_torch_merges(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    gta_kernels._library.cache_clear()
    try:
        assert gta_kernels.unavailable() == "no C compiler (no-such-cc) on PATH"
        assert not gta_kernels.supports(torch.zeros(2))
        base = torch.zeros(2, 3, dtype=torch.bfloat16)
        out = _merge("task_arithmetic", base, [base + 1], [{"weight": 0.5}], {}, 1, True, monkeypatch)
        assert torch.equal(out, torch.full((2, 3), 0.5, dtype=torch.bfloat16))
        assert not any(tmp_path.iterdir())
    finally:
        gta_kernels._library.cache_clear()


def test_the_library_is_compiled_once_into_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    gta_kernels._library.cache_clear()
    try:
        assert gta_kernels.unavailable() is None
        built = list((tmp_path / "streammerge").iterdir())
        assert len(built) == 1 and built[0].name.startswith("gta_kernels-") and built[0].suffix == ".so"
        stamp = built[0].stat().st_mtime_ns
        gta_kernels._library.cache_clear()
        assert gta_kernels.unavailable() is None
        assert [p.stat().st_mtime_ns for p in (tmp_path / "streammerge").iterdir()] == [stamp]
    finally:
        gta_kernels._library.cache_clear()


@pytest.mark.parametrize("method", METHODS)
def test_ordinary_chunks_are_merged_by_the_kernels(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On finite inputs every chunk's merge (and TIES's first pass) runs compiled, not on torch."""
    calls = {"merge": 0, "histograms": 0}
    for name in calls:
        real = getattr(gta_kernels, {"merge": "merge", "histograms": "delta_histograms"}[name])

        def spy(*args, _real=real, _name=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            out = _real(*args, **kwargs)
            calls[_name] += out is not None
            return out

        monkeypatch.setattr(gta_kernels, {"merge": "merge", "histograms": "delta_histograms"}[name], spy)
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(8, 64, generator=g) * 0.02).bfloat16()
    models = [(base.float() + torch.randn(8, 64, generator=g) * 2e-3).bfloat16() for _ in range(2)]
    per_model = [
        {"weight": 0.5} | ({} if method == "task_arithmetic" else {"density": 0.4}) for _ in models
    ]
    _merge(method, base, models, per_model, {}, 2, True, monkeypatch)
    assert calls["merge"] == 4
    assert calls["histograms"] == (4 if method == "ties" else 0)
