"""Data-aware merging on Llama-2-7B-shaped models: peak RSS and wall time of each step, against a
plain TIES merge in the same run.

    python benchmarks/data_aware_memory.py [--layers 4 8] [--samples 32] [--seqlen 512] \\
        [--skip-fisher | --fisher-only] [--cache-dir DIR] [--json FILE] [--report [JSON ...]]

The models are ``workload.py``'s base and two fine-tunes (Llama-2-7B tensor shapes, bf16) with
``eval_memory.py``'s tokenizer and text. Each fine-tune calibrates on its own windows of that text:
ft1 on the first ``--samples`` windows of ``--seqlen`` tokens, ft2 on ``--samples`` windows drawn
with ``--shuffle --seed 1``. Every step runs in a child process after its inputs (checkpoints and
statistics) are evicted from the page cache; its peak RSS is the child's ``ru_maxrss`` and the
sampled anonymous + file-backed RSS. The steps, in the order that gives the most per minute:

1. per layer count: ``streammerge calibrate`` of ft1 and of ft2 (gram, sqnorm); ties with
   ``importance: sparsegpt`` and regmean reading those statistics (``calibration: {stats: DIR}``
   per model); a plain ties merge;
2. per layer count (unless ``--skip-fisher``): ``streammerge calibrate --stats fisher`` of ft1 and
   ft2; a fisher merge reading them (and, with ``--fisher-only``, the plain ties baseline).

Each row is written to ``--json`` when its step ends, so an interrupted run still reports
(``--report`` prints the table and checks of that file, or of several runs' files together, without
running anything). Wall times depend on what else the machine runs; CPU seconds (user + system of
the child) less so. The checks:
every step's peak (ru_maxrss) at most 2.5 GiB, and each step's peak flat within 10% (max/min)
over the layer counts; the exit status is 1 when one fails.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compare import plan  # noqa: E402
from eval_memory import TEXT, prepare  # noqa: E402
from workload import evict, measure  # noqa: E402

PEAK_LIMIT_GIB, FLAT = 2.5, 1.10
DENSITY = 0.5  # compare.py's ties density


def calibrate_cmd(model: Path, text: Path, kinds: str, shuffle_seed: int | None, out: Path,
                  args: argparse.Namespace) -> list[str]:
    draw = ["--shuffle", "--seed", str(shuffle_seed)] if shuffle_seed is not None else []
    return [sys.executable, "-m", "streammerge", "calibrate", str(model), "--data", str(text), "--samples",
            str(args.samples), "--seqlen", str(args.seqlen), *draw, "--stats", kinds, "-o", str(out),
            "--quiet"]


def data_aware_plan(method: str, base: Path, stats: dict[Path, Path], **parameters: object) -> dict:
    """compare.py's ties plan with each fine-tune's statistics; regmean and fisher take no base."""
    p = plan("ties", base, *stats)
    for entry in p["models"]:
        entry["calibration"] = {"stats": str(stats[Path(entry["model"])])}
    if method != "ties":
        p = {"merge_method": method, "dtype": p["dtype"],
             "models": [{"model": e["model"], "calibration": e["calibration"]} for e in p["models"]]}
    if parameters:
        p["parameters"] = parameters
    return p


def steps(layers: int, args: argparse.Namespace, fisher: bool) -> list[tuple[str, list[str], list[Path]]]:
    """(step name, command, inputs to evict first) for one layer count: the gram group or the fisher one."""
    root = prepare(args.cache_dir, layers, 4 * args.seqlen * args.samples)
    base, fts = root / "base", [root / "ft1", root / "ft2"]
    text, work = args.cache_dir / TEXT, args.cache_dir / "data-aware"
    kind = "fisher" if fisher else "gram,sqnorm"
    stats = {ft: work / f"stats-{layers}L-{ft.name}-{kind.split(',')[0]}-{args.samples}x{args.seqlen}"
             for ft in fts}
    out = [(f"calibrate {kind} {ft.name}",
             calibrate_cmd(ft, text, kind, None if i == 0 else i, stats[ft], args), [ft])
           for i, ft in enumerate(fts)]
    plans = {"fisher": data_aware_plan("fisher", base, stats)} if fisher else {
        "ties importance=sparsegpt": data_aware_plan("ties", base, stats, importance="sparsegpt"),
        "regmean": data_aware_plan("regmean", base, stats)}
    if not fisher or args.fisher_only:  # the baseline, once per run
        plans["ties (plain)"] = plan("ties", base, *fts)
    for name, p in plans.items():
        slug = name.split()[0] + ("-sparsegpt" if "sparsegpt" in name else "")
        plan_file = work / f"{slug}-{layers}L.yaml"  # JSON is YAML
        plan_file.write_text(json.dumps(p, indent=2))
        cmd = [sys.executable, "-m", "streammerge", "run", str(plan_file),
               str(work / "out" / f"{slug}-{layers}L"), "--overwrite", "--quiet"]
        out.append((name, cmd, [Path(m["model"]) for m in p["models"]] + [base]
                    + [Path(m["calibration"]["stats"]) for m in p["models"] if "calibration" in m]))
    return out


def run_step(layers: int, name: str, cmd: list[str], inputs: list[Path], log_dir: Path, windows: str) -> dict:
    evict(inputs)
    log = log_dir / f"{layers}L-{name.replace(' ', '_').replace('=', '-')}.log"
    row = measure(cmd, log)
    del row["timeline"]
    row.update(layers=layers, step=name, windows=windows, command=" ".join(cmd), ok=row["exit_code"] == 0,
               output=log.read_text(errors="replace")[-2000:])
    print(f"  {layers}L {name:<28} {row['wall_s']:7.1f} s  ru_maxrss {row['peak_rss_gib']:.2f} GiB  "
          f"anon+file {row['peak_anon_file_gib']:.2f} GiB{'' if row['ok'] else '  FAILED: ' + row['output']}",
          file=sys.stderr, flush=True)
    return row


def table(rows: list[dict]) -> str:
    ties = {r["layers"]: r for r in rows if r["step"] == "ties (plain)" and r["ok"]}
    lines = ["| layers | step | calibration windows | peak RSS GiB | peak anon+file GiB | wall s | CPU s "
             "| peak, CPU vs plain ties |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        step = r["step"] + ("" if r["ok"] else f" (FAILED, exit {r['exit_code']})")
        t = ties.get(r["layers"])
        vs = f"{r['peak_rss_gib'] / t['peak_rss_gib']:.2f}×, {r['cpu_s'] / t['cpu_s']:.1f}×" if t else "–"
        lines.append(f"| {r['layers']} | {step} | {r['windows']} | {r['peak_rss_gib']:.2f} "
                     f"| {r['peak_anon_file_gib']:.2f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {vs} |")
    return "\n".join(lines)


def checks(rows: list[dict]) -> list[tuple[bool, str]]:
    out = []
    for r in rows:
        out.append((r["ok"] and r["peak_rss_gib"] <= PEAK_LIMIT_GIB,
                    f"{r['layers']}L {r['step']}: peak RSS {r['peak_rss_gib']:.2f} GiB "
                    f"<= {PEAK_LIMIT_GIB} GiB"
                    + ("" if r["ok"] else f" (exit {r['exit_code']})")))
    for step, windows in dict.fromkeys((r["step"], r["windows"]) for r in rows):  # like with like
        peaks = {r["layers"]: r["peak_rss_gib"] for r in rows
                 if (r["step"], r["windows"]) == (step, windows) and r["ok"]}
        if len(peaks) > 1:
            ratio = max(peaks.values()) / min(peaks.values())
            listed = ", ".join(f"{v:.2f} at {n}L" for n, v in sorted(peaks.items()))
            out.append((ratio <= FLAT, f"{step} ({windows} windows): peak flat within {FLAT - 1:.0%} "
                        f"over the layer counts: {listed} GiB, max/min {ratio:.3f}"))
    return out


def report(rows: list[dict]) -> bool:
    print(table(rows) + "\n")
    verdicts = checks(rows)
    for ok, line in verdicts:
        print(f"{'ok  ' if ok else 'FAIL'} {line}")
    return all(ok for ok, _ in verdicts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8], help="decoder layer counts")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows per fine-tune")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--skip-fisher", action="store_true", help="no Fisher calibration or fisher merge")
    group.add_argument("--fisher-only", action="store_true", help="only the Fisher calibration and merge")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/streammerge-bench"),
                    help="generated checkpoints, tokenizer and text (shared with eval_memory.py)")
    ap.add_argument("--json", type=Path, help="rows written here as they finish "
                    "(default: CACHE_DIR/data-aware/results.json)")
    ap.add_argument("--report", type=Path, nargs="*", metavar="JSON",
                    help="print the table and checks of these files (default --json), rows of separate "
                         "runs together; run nothing")
    args = ap.parse_args()
    args.cache_dir = args.cache_dir.resolve()
    work = args.cache_dir / "data-aware"
    args.json = args.json or work / "results.json"
    if args.report is not None:
        rows = []
        for f in args.report or [args.json]:
            run = json.loads(f.read_text())
            rows += [{"windows": f"{run['samples']}×{run['seqlen']}", **r} for r in run["rows"]]
        # in the order a single run takes: the gram group by layers, then the fisher one
        rows.sort(key=lambda r: (r["step"].startswith(("calibrate fisher", "fisher")), r["layers"]))
        sys.exit(0 if report(rows) else 1)
    work.mkdir(parents=True, exist_ok=True)
    groups = ([] if args.fisher_only else [False]) + ([] if args.skip_fisher else [True])
    rows: list[dict] = []
    for fisher in groups:
        for layers in sorted(args.layers):
            for name, cmd, inputs in steps(layers, args, fisher):
                rows.append(run_step(layers, name, cmd, inputs, work, f"{args.samples}×{args.seqlen}"))
                shutil.rmtree(work / "out", ignore_errors=True)  # a merged model: GBs, measured already
                args.json.write_text(json.dumps(
                    {"samples": args.samples, "seqlen": args.seqlen, "rows": rows}, indent=2))
    ok = report(rows)
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(parent peak RSS {parent:.0f} MiB: a floor under every ru_maxrss above)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
