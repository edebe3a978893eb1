"""Compiled kernels (C) for the methods' hottest loops, each bit for bit its torch path.

- ``merge`` and ``delta_histograms``: the task-arithmetic family's merge and TIES's first pass.
  Plain task arithmetic (nothing dropped, no sign election) has a leaner kernel of its own.
  The torch path (``task_arithmetic._gta``) runs mergekit's recipe one operation at a time, each a
full pass over the chunk with its own temporary: δ_i = x_i − B, the keep mask, the weight, the
election's sum, the masked sum, the divisor, the division, the base. ``compiled.c`` runs the same
operations per block of 2048 elements, in cache, and TIES's first pass (a histogram of |δ_i|'s
bfloat16 keys) in the same loop that forms δ_i. Bit for bit (see the C file for how); a chunk
whose task vectors or result hold NaN or Inf is handed back (``None``) for the torch path, whose
vectorized and scalar loops write NaN with different bits.
- ``linear``: linear's float32 weighted sum, widening bfloat16 or float16 inputs as it loads them.
- ``slerp`` and ``products``: slerp's weighted sum, widening as it loads, and its dot pass's terms.
- ``abs_delta``: |x − B|, DARE's and DELLA's L1 pass.
- ``all_finite``: the engine's check that an input or a result holds no NaN or Inf.
- ``stream_below``, ``stream_uniform_below``: DARE's and DELLA's keep masks from ``random.Stream``'s
  counter-based draws.
- ``della_keep``: DELLA's keep mask, from magnitude ranks along rows of bfloat16 and those draws.

The C file is compiled on first use with the system's C compiler (``$CC``, else ``cc``) for this
machine's CPU, into ``$XDG_CACHE_HOME/streammerge`` (``~/.cache``), keyed by the source, the flags
and the CPU; without a compiler ``unavailable()`` says why and the torch path merges alone.
numba was measured first: the same loops cost as much CPU, and importing it added 140 MB of RSS.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from streammerge.methods.base import Chunk

_SOURCE = Path(__file__).with_name("compiled.c")
# -ffp-contract=off: no fused multiply-adds, which round once where torch rounds twice.
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c11", "-shared", "-fPIC")
_SUFFIX = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
KEEP_ALL, KEEP_AT_LEAST, KEEP_ABOVE, KEEP_MASKED = 0, 1, 2, 3  # how a model's keep mask is given

_p = ctypes.c_void_p
_MERGE_ARGS = (
    _p,
    _p,
    ctypes.c_int,
    ctypes.c_int64,
    _p,
    _p,
    _p,
    _p,
    _p,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_float,
    ctypes.c_float,
    _p,
)


@dataclass(frozen=True)
class Keep:
    """Model i's keep mask: all, magnitude key ≥ or > ``threshold`` (``selection.magnitude_keys``),
    or the bools ``mask``."""

    mode: int = KEEP_ALL
    threshold: int = 0
    mask: torch.Tensor | None = None


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return "\n".join(
        sorted({line for line in info.splitlines() if line.startswith(("model name", "flags"))})
    )


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streammerge"


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The compiled kernels, or why there are none."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH"
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        source + " ".join((cc, *_FLAGS, platform.machine(), _cpu_id())).encode()
    ).hexdigest()[:16]
    lib = _cache_dir() / f"compiled-{key}.so"
    if not lib.is_file():
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(
                dir=lib.parent
            ) as tmp:  # renamed into place: never half-written
                built = Path(tmp) / lib.name
                done = subprocess.run(
                    [cc, *_FLAGS, str(_SOURCE), "-o", str(built)], capture_output=True, text=True
                )
                if done.returncode != 0:
                    return f"{cc} could not compile {_SOURCE.name}: {done.stderr.strip()[:300]}"
                os.replace(built, lib)
        except OSError as e:
            return f"cannot write {lib.parent} ({e.strerror})"
    dll = ctypes.CDLL(str(lib))  # ctypes releases the GIL for the call: workers merge side by side
    for suffix in _SUFFIX.values():
        getattr(dll, f"gta_merge_{suffix}").argtypes = _MERGE_ARGS
        getattr(dll, f"task_sum_{suffix}").argtypes = (_p, _p, ctypes.c_int, ctypes.c_int64, _p,
                                                       ctypes.c_float, ctypes.c_float, _p)
        getattr(dll, f"linear_{suffix}").argtypes = (_p, ctypes.c_int, ctypes.c_int64, _p, ctypes.c_int,
                                                     ctypes.c_int, ctypes.c_float, _p)
        getattr(dll, f"all_finite_{suffix}").argtypes = (_p, ctypes.c_int64)
        getattr(dll, f"abs_delta_{suffix}").argtypes = (_p, _p, ctypes.c_int64, _p)
        getattr(dll, f"slerp_{suffix}").argtypes = (_p, _p, ctypes.c_int64, ctypes.c_float,
                                                    ctypes.c_float, _p)
        getattr(dll, f"slerp_{suffix}").restype = None
        getattr(dll, f"products_{suffix}").argtypes = (_p, _p, ctypes.c_int64, _p)
        getattr(dll, f"products_{suffix}").restype = None
    dll.gta_histograms_bf16.argtypes = (_p, _p, ctypes.c_int, ctypes.c_int64, _p, _p)
    dll.stream_below.argtypes = (ctypes.c_uint32, ctypes.c_int64, ctypes.c_uint32, _p)
    dll.stream_below.restype = None
    dll.stream_uniform_below.argtypes = (ctypes.c_uint32, ctypes.c_int64, _p, _p)
    dll.stream_uniform_below.restype = None
    dll.della_keep.argtypes = (_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_double, ctypes.c_double,
                               _p, _p, ctypes.c_int, _p)
    return dll


def unavailable() -> str | None:
    """Why the compiled kernels cannot run here, or None when they can."""
    lib = _library()
    return lib if isinstance(lib, str) else None


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _SUFFIX and unavailable() is None


def computes_float32(chunk: Chunk, loaded: list[torch.Tensor]) -> bool:
    """Whether a float32 kernel here computes ``chunk`` from ``loaded`` (its inputs as loaded) as its
    torch path does from them widened: mergekit's float32 order (not ``wide``), on the CPU, from
    inputs of one dtype and shape."""
    in_float32 = (chunk.compute_dtype or loaded[0].dtype) == torch.float32
    return (not chunk.wide and in_float32 and supports(loaded[0])
            and all(x.dtype == loaded[0].dtype and x.shape == loaded[0].shape for x in loaded))


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _array(ctype: type, values: list) -> ctypes.Array:
    return (ctype * len(values))(*values)


def merge(
    base: torch.Tensor,
    models: list[torch.Tensor],
    keep: list[Keep],
    scales: list[float],
    weights: list[float],
    consensus: bool,
    normalize: bool,
    divide: float,
    lam: float,
) -> torch.Tensor | None:
    """out = B + λ·mixed, mixed as ``_gta`` computes it from
    δ_i = keep_i ⊙ (x_i − B) · scale_i · w_i:
    with ``consensus``, Σ_i of the δ agreeing with the sign of Σ_i δ_i (divided, with ``normalize``,
    by the agreeing models' Σ w_i, zero read as one); else Σ_i δ_i (divided by ``divide`` unless 0).
    ``weights`` are already rounded to the working dtype. None when a value is not finite."""
    base = base.contiguous()
    models = [x.contiguous() for x in models]
    out = torch.empty_like(base)
    if not consensus and all(k.mode == KEEP_ALL for k in keep) and all(s == 1.0 for s in scales):
        clean = getattr(_library(), f"task_sum_{_SUFFIX[base.dtype]}")(
            base.data_ptr(), _pointers(models), len(models), base.numel(),
            _array(ctypes.c_float, weights), divide, lam, out.data_ptr())
        return out if clean else None
    masks = [k.mask.contiguous().view(torch.uint8) if k.mode == KEEP_MASKED else base for k in keep]
    clean = getattr(_library(), f"gta_merge_{_SUFFIX[base.dtype]}")(
        base.data_ptr(),
        _pointers(models),
        len(models),
        base.numel(),
        _array(ctypes.c_int, [k.mode for k in keep]),
        _array(ctypes.c_int64, [k.threshold for k in keep]),
        _pointers(masks),
        _array(ctypes.c_float, scales),
        _array(ctypes.c_float, weights),
        consensus,
        normalize,
        divide,
        lam,
        out.data_ptr(),
    )
    if clean < 0:
        raise MemoryError("compiled: out of memory for a block's scratch")
    return out if clean else None


@functools.cache
def _addcmul_fused() -> bool | None:
    """Whether torch's float32 ``addcmul_`` rounds once (a fused multiply-add) on this machine,
    in its vectorized loop and its scalar one alike; None if they differ or it is neither.

    It depends on the torch build and the CPU kernels it dispatches to (x86-64 builds with FMA
    fuse). The probe is c + a*a with a = 1 + 2**-12, c = -(1 + 2**-11): exactly 2**-24 when fused,
    0 when the product is rounded first; 67 elements cover the vector body and the scalar tail."""
    a = 1 + 2**-12
    out = torch.full((67,), -(1 + 2**-11), device="cpu").addcmul_(torch.full((67,), a, device="cpu"),
                                                                  torch.tensor(a, device="cpu"))
    for fused, want in ((True, 2**-24), (False, 0.0)):
        if bool((out == want).all()):
            return fused
    return None


def linear(models: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor | None:
    """``linear_merge``'s torch path in float32 from inputs of one dtype as loaded:
    Σ_i x_i·w_i by ``addcmul_`` from zero, divided by Σ_i w_i (summed by torch, in float32) when
    ``normalize``. None when a result is not finite or this machine's torch rounds ``addcmul_``
    in a way the kernel does not know."""
    fused = _addcmul_fused()
    if fused is None:
        return None
    models = [x.contiguous() for x in models]
    w = torch.tensor(weights, dtype=torch.float32, device="cpu")
    out = torch.empty(models[0].shape, dtype=torch.float32, device="cpu")
    clean = getattr(_library(), f"linear_{_SUFFIX[models[0].dtype]}")(
        _pointers(models), len(models), out.numel(), w.data_ptr(), fused, normalize, w.sum().item(),
        out.data_ptr(),
    )
    return out if clean else None


def delta_histograms(
    base: torch.Tensor, models: list[torch.Tensor], wanted: list[bool]
) -> list[torch.Tensor | None] | None:
    """Per wanted model, ``torch.bincount(magnitude_keys(x_i - B), minlength=2**15)`` of bfloat16
    inputs. None when a δ is not finite."""
    base = base.contiguous()
    models = [x.contiguous() for x in models]
    hists = torch.zeros((len(models), 1 << 15), dtype=torch.int64, device=base.device)
    clean = _library().gta_histograms_bf16(
        base.data_ptr(),
        _pointers(models),
        len(models),
        base.numel(),
        _array(ctypes.c_uint8, [int(w) for w in wanted]),
        hists.data_ptr(),
    )
    if clean < 0:
        raise MemoryError("compiled: out of memory for a block's scratch")
    return [h if w else None for h, w in zip(hists, wanted)] if clean else None


def slerp(v0: torch.Tensor, v1: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
    """``s0 * v0 + s1 * v1`` as torch computes it with ``v0``, ``v1`` widened to float32."""
    v0, v1 = v0.contiguous(), v1.contiguous()
    out = torch.empty(v0.shape, dtype=torch.float32, device="cpu")
    getattr(_library(), f"slerp_{_SUFFIX[v0.dtype]}")(v0.data_ptr(), v1.data_ptr(), v0.numel(), s0, s1,
                                                       out.data_ptr())
    return out


def products(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """float64 ``[v0 * v1, v0 * v0, v1 * v1]`` (stacked, each shaped as ``v0``) of ``v0``, ``v1``
    widened to float64."""
    v0, v1 = v0.contiguous(), v1.contiguous()
    out = torch.empty((3, *v0.shape), dtype=torch.float64, device="cpu")
    getattr(_library(), f"products_{_SUFFIX[v0.dtype]}")(v0.data_ptr(), v1.data_ptr(), v0.numel(),
                                                          out.data_ptr())
    return out


def abs_delta(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """|x − B| as torch's ``(x - base).abs()`` computes it (both of a dtype ``supports``, one shape),
    or None when x − B holds NaN or Inf."""
    base, x = base.contiguous(), x.contiguous()
    out = torch.empty_like(base)
    kernel = getattr(_library(), f"abs_delta_{_SUFFIX[base.dtype]}")
    clean = kernel(base.data_ptr(), x.data_ptr(), base.numel(), out.data_ptr())
    return out if clean == 1 else None


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x`` (of a dtype ``supports``)."""
    x = x.contiguous()
    return getattr(_library(), f"all_finite_{_SUFFIX[x.dtype]}")(x.data_ptr(), x.numel()) == 1


def stream_below(start: int, bound: int, out: torch.Tensor) -> None:
    """``out`` (bool, contiguous) = [fmix32(start + j·φ mod 2³²) < bound] (``random.Stream.below``)."""
    _library().stream_below(start, out.numel(), bound, out.data_ptr())


def stream_uniform_below(start: int, p: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` (bool) = [uniform j < p[j]] for float64 ``p`` (``random.Stream.below_each``)."""
    _library().stream_uniform_below(start, out.numel(), p.contiguous().data_ptr(), out.data_ptr())


def della_keep(
    score: torch.Tensor, low: float, eps: float, runs: list[tuple[int, int]]
) -> torch.Tensor | None:
    """For a bfloat16 matrix, the bool mask [u < low + (rank / (cols - 1)) * 2 * eps] with rank
    ``score.abs().argsort(dim=1, stable=True).argsort(dim=1)`` and u the uniforms of ``runs``
    (``random.Stream.runs`` of the flat elements): DELLA's keep mask; None where a score is NaN,
    whose payloads torch sorts as equal."""
    keys = score.contiguous().view(torch.int16)
    out = torch.empty(keys.shape, dtype=torch.bool)
    offsets = _array(ctypes.c_int64, [at for at, _ in runs])
    starts = _array(ctypes.c_uint32, [start for _, start in runs])
    rows, cols = keys.shape
    done = _library().della_keep(keys.data_ptr(), rows, cols, low, eps, offsets, starts, len(runs),
                                 out.data_ptr())
    if done < 0:
        raise MemoryError("compiled: out of memory for a row's counts")
    return out if done == 1 else None
