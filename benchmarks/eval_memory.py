"""streammerge eval against transformers' from_pretrained, on Llama-2-7B-shaped models: peak RSS,
wall time and perplexity.

    python benchmarks/eval_memory.py [--layers 2 4 8] [--seqlen 512] [--samples 32] [--repeat N] \\
        [--generate-tokens 8] [--compare] [--cache-dir DIR] [--json out.json]

The models are ``workload.py``'s (Llama-2-7B tensor shapes and config, bf16, random weights of
scale 0.02, the layer count the only difference), generated once under ``--cache-dir`` and given a
32000-entry word-level tokenizer and a deterministic text of Zipf-distributed words. Each layer
count runs in child processes, each after the model is evicted from the page cache, so each peak
is its own:

- **streammerge**: ``python -m streammerge eval MODEL --data TEXT --seqlen S --samples N --json``.
- **transformers**: ``AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16)`` scoring
  the same windows (streammerge's ``tokenize``/``cut_windows`` under the same protocol), 4 windows
  a batch: logits to float32, cross entropy of positions 1..S-1 of each window, summed;
  perplexity = exp(mean).

Peak RSS is the child's ``ru_maxrss`` and the sampled anonymous + file-backed RSS. The checks:
streammerge's peak (ru_maxrss) at most 2 GiB and flat within 10% (max/min) over the layer
counts, transformers' peak growing with the layers, and the two perplexities within 1e-4 relative
at each layer count; the exit status is 1 when one fails.

``--generate-tokens T``: greedy generation on the largest model, ``--max-new-tokens`` 1 and T; the
difference over T-1 is the seconds per generated token. ``--compare``: ``streammerge compare``
on the 4-layer base and its two fine-tunes (``workload.py``'s base + small bf16 deltas) with the
methods linear, ties and task_arithmetic; its table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from itertools import product
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workload import MODELS, VOCAB, ensure_inputs, evict, llama_shapes, measure  # noqa: E402

SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: workload's config has bos_token_id 1, eos_token_id 2
TEXT = "text.txt"
BATCH = 4  # windows per forward in the transformers baseline (streammerge's batches are 2048 tokens)
PEAK_LIMIT_GIB, FLAT, PPL_RTOL = 2.0, 1.10, 1e-4
COMPARE_METHODS = ("linear", "ties", "task_arithmetic")
PROMPT = "the first words of a prompt"


# ----------------------------------------------------------------------------- inputs


def words() -> list[str]:
    """VOCAB - 3 distinct lowercase words: every string of 1, 2, 3 letters, then 4-letter ones."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out: list[str] = []
    for n in range(1, 5):
        out += ["".join(t) for t in product(letters, repeat=n)]
    return out[:VOCAB - len(SPECIAL)]


def write_tokenizer(model_dir: Path) -> None:
    """A word-level tokenizer over ``words()`` whose template puts ``<s>`` first, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate([*SPECIAL, *words()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
         "eos_token": "</s>"}))


def write_text(path: Path, tokens: int) -> None:
    """``tokens`` words drawn with Zipf weights (1/rank) from the vocabulary, 20 to a line."""
    vocab = words()
    rng = random.Random(0)
    drawn = rng.choices(vocab, weights=[1 / (r + 1) for r in range(len(vocab))], k=tokens)
    path.write_text("\n".join(" ".join(drawn[k:k + 20]) for k in range(0, tokens, 20)) + "\n")


def prepare(cache: Path, layers: int, tokens: int) -> Path:
    """workload's checkpoints for ``layers`` (generated in a child the first time), each given the
    tokenizer, and the text; the directory holding base/ft1/ft2."""
    root = ensure_inputs(cache, layers)
    missing = [str(root / m) for m in MODELS if not (root / m / "tokenizer.json").is_file()]
    if missing:  # in a child: the measuring parent must stay small (see workload.py)
        subprocess.run([sys.executable, __file__, "--write-tokenizers", *missing], check=True)
    text = cache / TEXT
    if not text.is_file() or len(text.read_text().split()) < tokens:
        write_text(text, tokens)
    return root


# ----------------------------------------------------------------------------- the baseline (child)


def transformers_child(model: str, data: str, seqlen: int, samples: int, out: str) -> None:
    """What the notebook scripts do: the whole model loaded by from_pretrained, the windows scored."""
    import time

    t0 = time.perf_counter()
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streammerge.evaluation.data import read_documents
    from streammerge.evaluation.windows import Protocol, cut_windows, tokenize

    protocol = Protocol(seqlen=seqlen, samples=samples)
    windows = cut_windows(tokenize(AutoTokenizer.from_pretrained(model), read_documents(data), protocol.join),
                          protocol)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for k in range(0, len(windows), BATCH):
            ids = torch.stack([w.ids for w in windows[k:k + BATCH]])
            logits = lm(input_ids=ids).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                  reduction="none")
            total += float(nll.double().sum())
            count += nll.numel()
            del logits, nll
    Path(out).write_text(json.dumps({"perplexity": math.exp(total / count), "nll": total / count,
                                     "tokens": count, "windows": len(windows),
                                     "seconds": time.perf_counter() - t0}))


# ----------------------------------------------------------------------------- the runs


def run(tool: str, cmd: list[str], model: Path, work: Path, result: Path) -> dict:
    """``cmd`` measured in a child after ``model`` is evicted; with the JSON it wrote to ``result``."""
    evict([model])
    result.unlink(missing_ok=True)
    log = work / f"{tool}.log"
    row = measure(cmd, log)
    del row["timeline"]
    row["ok"] = row["exit_code"] == 0 and result.is_file()
    if row["ok"]:
        row.update(json.loads(result.read_text()))
    else:
        print(f"{tool} failed (exit {row['exit_code']}): {' '.join(cmd)}\n"
              f"{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
    return row


def median_row(runs: list[dict]) -> dict:
    """One row for repeated runs: each number's median over the runs, and every run's in ``runs``."""
    ok = all(r["ok"] for r in runs)
    numbers = [k for k, v in runs[0].items() if type(v) in (int, float) and k != "exit_code"] if ok else []
    return {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in numbers}, "ok": ok,
            "repeats": len(runs), "runs": [{k: r.get(k) for k in ("peak_rss_gib", "wall_s", "perplexity")}
                                           for r in runs]}


def bench(layers: int, args: argparse.Namespace, work: Path) -> list[dict]:
    model = prepare(args.cache_dir, layers, args.seqlen * args.samples + 1000) / "base"
    text, result = args.cache_dir / TEXT, work / "result.json"
    protocol = [str(text), str(args.seqlen), str(args.samples)]
    cmds = {
        "streammerge": [sys.executable, "-m", "streammerge", "eval", str(model), "--data", str(text),
                        "--seqlen", str(args.seqlen), "--samples", str(args.samples), "--json", str(result),
                        "--quiet"],
        "transformers": [sys.executable, __file__, "--transformers-child", str(model), *protocol,
                         str(result)],
    }
    rows = []
    for tool in args.tools:
        runs = []
        for _ in range(args.repeat):
            row = {"layers": layers, "tool": tool, **run(tool, cmds[tool], model, work, result)}
            print(f"  {layers}L {tool:<12} {row['wall_s']:7.1f} s  ru_maxrss {row['peak_rss_gib']:.2f} GiB  "
                  f"anon+file {row['peak_anon_file_gib']:.2f} GiB  perplexity {row.get('perplexity')}",
                  file=sys.stderr)
            runs.append(row)
        rows.append(median_row(runs) if len(runs) > 1 else runs[0])
    return rows


def generation(args: argparse.Namespace, work: Path) -> dict:
    """Greedy generation on the largest model, of 1 and of ``args.generate_tokens`` new tokens: the
    difference of the two runs' seconds is what the tokens after the first took."""
    layers = max(args.layers)
    model = prepare(args.cache_dir, layers, args.seqlen * args.samples + 1000) / "base"
    result = work / "generate.json"
    out: dict = {"layers": layers}
    for key, n in (("one", 1), ("many", args.generate_tokens)):
        cmd = [sys.executable, "-m", "streammerge", "eval", str(model), "--prompt", PROMPT,
               "--max-new-tokens", str(n), "--json", str(result), "--quiet"]
        row = run(f"generate-{n}", cmd, model, work, result)
        out[key] = {"ok": row["ok"], "seconds": row.get("seconds"), "wall_s": row["wall_s"],
                    "peak_rss_gib": row["peak_rss_gib"],
                    "tokens": len(row["generations"][0]["tokens"]) if row["ok"] else 0}
    one, many = out["one"], out["many"]
    if one["ok"] and many["ok"] and many["tokens"] > 1:
        out["s_per_token"] = (many["seconds"] - one["seconds"]) / (many["tokens"] - 1)
    return out


def compare(args: argparse.Namespace, work: Path) -> dict:
    """``streammerge compare`` on the 4-layer base and fine-tunes with three methods."""
    root = prepare(args.cache_dir, 4, args.seqlen * args.samples + 1000)
    plan = work / "compare-4L.yaml"  # JSON is YAML
    # the base is listed too, so linear (which has no base model) averages all three; the methods
    # with a base model take it out of the tasks
    plan.write_text(json.dumps({"merge_method": "ties", "base_model": str(root / "base"), "dtype": "bfloat16",
                                "parameters": {"weight": 0.5},
                                "models": [{"model": str(root / m)} for m in MODELS]}, indent=2))
    out = args.cache_dir / "out" / "compare-4L"
    cmd = [sys.executable, "-m", "streammerge", "compare", str(plan), "--methods", *COMPARE_METHODS,
           "--data", str(args.cache_dir / TEXT), "-o", str(out), "--seqlen", str(args.seqlen),
           "--samples", str(args.compare_samples), "--quiet"]
    shutil.rmtree(out, ignore_errors=True)
    evict([root / m for m in MODELS])
    log = work / "compare.log"
    row = measure(cmd, log)
    del row["timeline"]
    return {**row, "output": log.read_text(errors="replace"), "command": " ".join(cmd)}


# ----------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    lines = ["| layers | tool | peak RSS GiB (ru_maxrss) | peak anon+file GiB | wall s | perplexity |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        tool = r["tool"] + ("" if r["ok"] else f" (FAILED, exit {r['exit_code']})")
        if r.get("repeats", 1) > 1:
            tool += f" (median of {r['repeats']})"
        ppl = f"{r['perplexity']:.6f}" if r["ok"] else "–"
        lines.append(f"| {r['layers']} | {tool} | {r['peak_rss_gib']:.2f} | {r['peak_anon_file_gib']:.2f} "
                     f"| {r['wall_s']:.1f} | {ppl} |")
    return "\n".join(lines)


def checks(rows: list[dict]) -> list[tuple[bool, str]]:
    """Each of the issue's targets, met or not, with its numbers."""
    out = []
    by = {(r["layers"], r["tool"]): r for r in rows}
    layers = sorted({r["layers"] for r in rows})
    sm = [by[(n, "streammerge")] for n in layers if (n, "streammerge") in by]
    hf = [by[(n, "transformers")] for n in layers if (n, "transformers") in by]
    if sm:
        peaks = [r["peak_rss_gib"] if r["ok"] else math.inf for r in sm]
        listed = ", ".join(f"{p:.2f}" for p in peaks)
        at = ", ".join(str(r["layers"]) for r in sm)
        out.append((max(peaks) <= PEAK_LIMIT_GIB,
                    f"streammerge peak RSS <= {PEAK_LIMIT_GIB} GiB: {listed} GiB at {at} layers"))
        if len(sm) > 1:
            flat = max(peaks) / min(peaks)
            out.append((flat <= FLAT, f"streammerge peak flat within {FLAT - 1:.0%} over the layer counts: "
                        f"max/min {flat:.3f}"))
    if len(hf) > 1:
        peaks = [r["peak_rss_gib"] if r["ok"] else math.nan for r in hf]
        grows = all(a < b for a, b in zip(peaks, peaks[1:]))
        listed = " < ".join(f"{p:.2f}" for p in peaks)
        out.append((grows, f"transformers peak RSS grows with the layers: {listed} GiB"))
    for n in layers:
        pair = by.get((n, "streammerge")), by.get((n, "transformers"))
        if all(pair) and all(r["ok"] for r in pair):
            a, b = pair[0]["perplexity"], pair[1]["perplexity"]
            rel = abs(a - b) / abs(b)
            out.append((rel <= PPL_RTOL, f"{n}L perplexities agree within {PPL_RTOL:g} relative: streammerge "
                        f"{a:.6f}, transformers {b:.6f}, relative difference {rel:.2e}"))
        elif all(pair):
            out.append((False, f"{n}L: a run failed, no perplexities to compare"))
    return out


def read_per_token(layers: int) -> int:
    """The bytes a generated token reads: every tensor but the token embedding, bf16."""
    return sum(2 * math.prod(shape) for name, shape in llama_shapes(layers) if "embed_tokens" not in name)


def print_generation(gen: dict) -> tuple[bool, str]:
    one, many = gen["one"], gen["many"]
    if not (one["ok"] and many["ok"]):
        return False, "generation ran"
    print(f"\ngeneration, {gen['layers']} layers, greedy, one prompt: {one['seconds']:.1f} s for 1 token, "
          f"{many['seconds']:.1f} s for {many['tokens']} (peak RSS {many['peak_rss_gib']:.2f} GiB)")
    if "s_per_token" in gen:
        # each token reads every layer and the head: scale by those bytes (the embedding gives a row)
        scale = read_per_token(32) / read_per_token(gen["layers"])
        print(f"  {gen['s_per_token']:.2f} s per token after the first; at 32 layers, scaled by the bytes "
              f"read per token (x{scale:.2f}), about {gen['s_per_token'] * scale:.0f} s (an extrapolation)")
    return True, "generation ran"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="decoder layer counts")
    ap.add_argument("--tools", nargs="+", default=["streammerge", "transformers"],
                    choices=["streammerge", "transformers"])
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--samples", type=int, default=32, help="windows scored")
    ap.add_argument("--repeat", type=int, default=1, help="run each tool this many times; report medians")
    ap.add_argument("--generate-tokens", type=int, default=0,
                    help="also time greedy generation of this many tokens on the largest model (0: skip)")
    ap.add_argument("--compare", action="store_true",
                    help="also run 'streammerge compare' on the 4-layer models")
    ap.add_argument("--compare-samples", type=int, default=8, help="windows each compare evaluation scores")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/streammerge-bench"),
                    help="generated checkpoints, tokenizer and text (reused; shared with compare.py)")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--transformers-child", nargs=5, metavar=("MODEL", "DATA", "SEQLEN", "SAMPLES", "OUT"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--write-tokenizers", nargs="+", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_tokenizers:
        for model_dir in args.write_tokenizers:
            write_tokenizer(model_dir)
        return
    if args.transformers_child:
        model, data, seqlen, samples, out = args.transformers_child
        transformers_child(model, data, int(seqlen), int(samples), out)
        return
    args.cache_dir = args.cache_dir.resolve()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="streammerge-eval-bench-") as tmp:
        for layers in sorted(args.layers):
            rows += bench(layers, args, Path(tmp))
        print(table(rows) + "\n", flush=True)
        verdicts = checks(rows)
        if args.generate_tokens:
            report["generation"] = generation(args, Path(tmp))
            verdicts.append(print_generation(report["generation"]))
        if args.compare:
            cmp = report["compare"] = compare(args, Path(tmp))
            print(f"\n$ {cmp['command']}\n{cmp['output']}(exit {cmp['exit_code']}, {cmp['wall_s']:.1f} s, "
                  f"peak RSS {cmp['peak_rss_gib']:.2f} GiB)")
            methods = ", ".join(COMPARE_METHODS)
            verdicts.append((cmp["exit_code"] == 0, f"compare ran end to end with {methods}"))
    print()
    for ok, line in verdicts:
        print(f"{'ok  ' if ok else 'FAIL'} {line}")
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(parent peak RSS {parent:.0f} MiB: a floor under every ru_maxrss above)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, **report, "checks": verdicts,
                                         "parent_peak_rss_mib": parent}, indent=2))
    sys.exit(0 if all(ok for ok, _ in verdicts) else 1)


if __name__ == "__main__":
    main()
