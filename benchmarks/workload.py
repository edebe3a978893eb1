"""The benchmark workload: Llama-2-7B-shaped checkpoints, page-cache eviction and child-process measurement.

Shared by the benchmark scripts (``compare.py`` is the entry point). Nothing here imports torch at
module level: the measuring parent must stay small, because subprocess spawns with vfork and at
exec Linux folds the parent's lifetime peak RSS into the child's ``ru_maxrss``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 4096, 11008, 32000, 32
FULL = (HIDDEN, INTERMEDIATE, VOCAB)  # Llama-2-7B's widths; smaller ones make quick smoke runs
SHARD_BYTES = 2 * 10**9
MODELS = ("base", "ft1", "ft2")
INDEX = "model.safetensors.index.json"
GiB = 2**30
SAMPLE_S = 0.05

# ----------------------------------------------------------------------------- synthetic checkpoints


def llama_shapes(layers: int,
                 dims: tuple[int, int, int] = FULL) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of Llama-2-7B truncated to ``layers`` decoder layers, in HF order
    (``dims``: hidden, intermediate and vocabulary sizes)."""
    hidden, intermediate, vocab = dims
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(f"{p}self_attn.{x}_proj.weight", (hidden, hidden)) for x in "qkvo"]
        shapes += [(f"{p}mlp.gate_proj.weight", (intermediate, hidden)),
                   (f"{p}mlp.up_proj.weight", (intermediate, hidden)),
                   (f"{p}mlp.down_proj.weight", (hidden, intermediate))]
        shapes += [(f"{p}input_layernorm.weight", (hidden,)),
                   (f"{p}post_attention_layernorm.weight", (hidden,))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def pack_shards(shapes: list[tuple[str, tuple[int, ...]]],
                shard_bytes: int = SHARD_BYTES) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedily group tensors, in order, into shards of at most ``shard_bytes`` of bf16."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def llama_config(layers: int, dims: tuple[int, int, int] = FULL) -> dict:
    hidden, intermediate, vocab = dims
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def is_generated(root: Path) -> bool:
    return all((root / m / INDEX).is_file() for m in MODELS)


def generate(root: Path, layers: int, seed: int = 0, shard_bytes: int = SHARD_BYTES,
             dims: tuple[int, int, int] = FULL) -> None:
    """Write base/ft1/ft2 under ``root``; the indexes are written last and mark them complete.

    base ~ N(0, 0.02) (norm weights 1 + N(0, 0.02)); ft1 = base + e, ft2 = base + 0.6 e + 0.8 flip(e),
    e ~ N(0, 0.002): deltas of equal scale, elementwise correlation 0.6 (flip pairs distinct elements)."""
    import torch  # here and in naive_ties only: the parent must not grow (see the module docstring)
    from safetensors.torch import save_file

    dirs = [root / m for m in MODELS]
    shards = pack_shards(llama_shapes(layers, dims), shard_bytes)
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / INDEX).unlink(missing_ok=True)
        (d / "config.json").write_text(json.dumps(llama_config(layers, dims), indent=2))
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        out: list[dict[str, torch.Tensor]] = [{}, {}, {}]
        for name, shape in shard:
            base = torch.randn(shape, generator=g).mul_(0.02)
            if name.endswith("norm.weight"):
                base.add_(1.0)
            e = torch.randn(shape, generator=g).mul_(0.002)
            out[0][name] = base.to(torch.bfloat16)
            out[1][name] = (base + e).to(torch.bfloat16)
            out[2][name] = (base + 0.6 * e + 0.8 * e.flip(-1)).to(torch.bfloat16)
            weight_map[name] = filename
            total += 2 * base.numel()
            del base, e
        for d, tensors in zip(dirs, out):
            save_file(tensors, d / filename, metadata={"format": "pt"})
            tensors.clear()
    for d in dirs:
        (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def evict(dirs: list[Path]) -> None:
    """Drop the checkpoints' pages from the page cache (fsync first: dirty pages are not dropped)."""
    for d in dirs:
        for f in d.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ----------------------------------------------------------------------------- measurement


def ensure_inputs(cache: Path, layers: int, shard_bytes: int = SHARD_BYTES,
                  dims: tuple[int, int, int] = FULL) -> Path:
    """The checkpoints for ``layers`` under ``cache``, generated in a child process the first time
    (a shard size or widths other than the defaults get folders of their own)."""
    root = cache / (f"llama2-7b-shape-{layers}L"
                    + (f"-{shard_bytes}B" if shard_bytes != SHARD_BYTES else "")
                    + ("-h{}-i{}-v{}".format(*dims) if dims != FULL else ""))
    if not is_generated(root):
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import workload; workload.generate(workload.Path({str(root)!r}), {layers}, 0, "
                        f"{shard_bytes}, {tuple(dims)!r})"], check=True)
    return root


def _status_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) in KiB from /proc/<pid>/status; zeros once the process is gone or a zombie."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    key, value = line.split(":")
                    fields[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields.get("RssAnon", 0), fields.get("RssFile", 0)


def cached_kib() -> int:
    """The page cache's size (``Cached`` in /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    return 0


def measure(cmd: list[str], log: Path, cgroup: Path | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> dict:
    """Run ``cmd`` as a child (inside ``cgroup``, a memory cgroup directory, when given; with ``env``
    added to the environment, in ``cwd``): exit code,
    ru_maxrss, sampled RSS peaks and timeline, page-cache growth, wall and CPU time."""
    peaks = {"anon": 0, "file": 0, "sum": 0}
    timeline: list[tuple[float, float]] = []
    cache_start = cached_kib()
    cache_peak = [cache_start]
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample(pid: int) -> None:
        while not stop.is_set():
            anon, file = _status_kib(pid)
            peaks["anon"], peaks["file"] = max(peaks["anon"], anon), max(peaks["file"], file)
            peaks["sum"] = max(peaks["sum"], anon + file)
            timeline.append((time.perf_counter() - t0, (anon + file) * 1024 / GiB))
            cache_peak[0] = max(cache_peak[0], cached_kib())
            stop.wait(SAMPLE_S)

    def enter_cgroup() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=enter_cgroup if cgroup else None,
                                env=None if env is None else {**os.environ, **env}, cwd=cwd)
    sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen
    return {
        "exit_code": proc.returncode,
        "peak_rss_gib": usage.ru_maxrss * 1024 / GiB,
        "peak_anon_gib": peaks["anon"] * 1024 / GiB,
        "peak_file_gib": peaks["file"] * 1024 / GiB,
        "peak_anon_file_gib": peaks["sum"] * 1024 / GiB,
        "cache_growth_gib": (cache_peak[0] - cache_start) * 1024 / GiB,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "timeline": timeline,
    }


def fsync_tree(path: Path) -> float:
    """fsync every file under ``path``; the seconds it took (what a tool that never syncs still owes)."""
    t0 = time.perf_counter()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0
