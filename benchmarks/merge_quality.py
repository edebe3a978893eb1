"""Does data-aware merging help? A small real experiment on the CPU, FusionBench-style.

    python benchmarks/merge_quality.py [--work DIR] [--quick] [--threads 2] [--json out.json] [--png out.png]

Four synthetic text tasks share one word-level tokenizer; every example is one line ending in ";":

- copy:    ``copy 3 1 4 1 = 3 1 4 1 ;``
- reverse: ``reverse 3 1 4 1 = 1 4 1 3 ;``
- inc:     ``inc 3 1 4 9 = 4 2 5 0 ;`` (each digit plus one, mod 10)
- dyck:    ``close ( [ ] { = } ) ;`` (close the brackets still open, innermost first)

Train and held-out examples come from fixed seeds; held-out examples never occur in the train split.
A tiny Llama (2 layers, hidden 128) is pretrained briefly on the mixture of the four train splits
(the base), then one copy per task is fine-tuned on that task's train text. The inputs are cached
in ``--work`` (rebuilt when the settings change). The four fine-tunes are merged with streammerge:
linear, task_arithmetic, ties, dare_ties, and the data-aware ties+wanda, ties+sparsegpt, regmean
and fisher, whose calibration data is each fine-tune's own train text. A data-aware row whose
method or plan keys this streammerge lacks prints "not available yet" with the reason.

Scoring, on each task's held-out examples, each run alone from ``<s>``: the answer tokens are those
after "=" up to, not including, ";". loss = mean next-token NLL of the answer tokens (teacher
forced); acc = the fraction of answer tokens whose greedy argmax prediction, given the true prefix,
is the answer token. The table has one row per model (base, each fine-tune, each merge) plus
"individual" (each fine-tune on its own task, FusionBench's reference row), a loss/acc pair per
task and their average; a PNG plots the average accuracy and loss per row. Data-aware merge times
include measuring the statistics the first time (they are cached by streammerge afterwards).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

import streammerge
from streammerge.errors import StreamMergeError
from streammerge.methods import method_names
from streammerge.plan import load_plan

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS = 0, 1, 2
DIGITS = tuple(str(d) for d in range(10))
OPEN, CLOSE = ("(", "[", "{", "<"), (")", "]", "}", ">")
TASKS = ("copy", "reverse", "inc", "dyck")
VOCAB = (*SPECIALS, "copy", "reverse", "inc", "close", "=", ";", *DIGITS, *OPEN, *CLOSE)
END = ";"


@dataclass(frozen=True)
class Settings:
    """Everything the trained models depend on; a change retrains them."""

    train_examples: int = 20000  # per task
    heldout_examples: int = 500  # per task
    layers: int = 2
    hidden: int = 128
    intermediate: int = 256
    heads: int = 4
    seqlen: int = 64  # packed training sequences
    batch: int = 32
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    finetune_steps: int = 150
    finetune_lr: float = 1e-3
    seed: int = 0


QUICK = Settings(train_examples=2000, heldout_examples=50, batch=8, pretrain_steps=10, finetune_steps=5)


# ---------------------------------------------------------------- data


def example(task: str, rng: random.Random) -> str:
    """One line of ``task``, drawn from ``rng``."""
    if task != "dyck":
        digits = [rng.randrange(10) for _ in range(rng.randint(4, 8))]
        answer = {"copy": digits, "reverse": digits[::-1], "inc": [(d + 1) % 10 for d in digits]}[task]
        return " ".join([task, *map(str, digits), "=", *map(str, answer), END])
    # dyck: a random bracket prefix with at least one bracket left open
    while True:
        stack: list[int] = []
        prefix: list[str] = []
        for _ in range(rng.randint(3, 8)):
            if stack and rng.random() < 0.4:
                prefix.append(CLOSE[stack.pop()])
            else:
                stack.append(rng.randrange(len(OPEN)))
                prefix.append(OPEN[stack[-1]])
        if stack:
            return " ".join(["close", *prefix, "=", *(CLOSE[k] for k in reversed(stack)), END])


def splits(task: str, s: Settings) -> tuple[list[str], list[str]]:
    """The train and held-out examples of ``task``; held-out ones never occur in train."""
    seed = s.seed * 1000 + TASKS.index(task)
    rng = random.Random(seed)
    train = [example(task, rng) for _ in range(s.train_examples)]
    seen, heldout = set(train), []
    rng = random.Random(seed + 500)
    while len(heldout) < s.heldout_examples:
        if (line := example(task, rng)) not in seen:
            heldout.append(line)
            seen.add(line)
    return train, heldout


def encode(line: str) -> list[int]:
    return [VOCAB.index(w) for w in line.split()]


# ---------------------------------------------------------------- models


def write_tokenizer(path: Path) -> None:
    """A word-level tokenizer over VOCAB that prepends ``<s>`` (what transformers and streammerge load)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)


def packed_batch(pool: list[list[int]], s: Settings, rng: random.Random) -> torch.Tensor:
    """``s.batch`` rows of ``<s>`` then random examples back to back, cut at ``s.seqlen`` tokens."""
    rows = []
    for _ in range(s.batch):
        row = [BOS]
        while len(row) < s.seqlen:
            row += rng.choice(pool)
        rows.append(row[:s.seqlen])
    return torch.tensor(rows)


def train(model: Any, pool: list[list[int]], steps: int, lr: float, s: Settings, seed: int) -> list[float]:
    """AdamW on the LM loss of every token, linear warm-up then cosine decay; the loss per step."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    model.train()
    losses = []
    for _ in range(steps):
        ids = packed_batch(pool, s, rng)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def build_inputs(work: Path, s: Settings) -> dict[str, Any]:
    """Data files, the base and the fine-tunes under ``work`` (reused when built with ``s``); returns
    what was built and the training seconds (0 when reused)."""
    stamp = work / "settings.json"
    data = work / "data"
    if stamp.is_file() and json.loads(stamp.read_text()).get("settings") == asdict(s):
        return json.loads(stamp.read_text())
    data.mkdir(parents=True, exist_ok=True)
    pools = {}
    for task in TASKS:
        train_lines, heldout = splits(task, s)
        (data / f"{task}_train.txt").write_text("\n".join(train_lines) + "\n")
        (data / f"{task}_heldout.txt").write_text("\n".join(heldout) + "\n")
        pools[task] = [encode(line) for line in train_lines]
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
        max_position_embeddings=2 * s.seqlen, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        tie_word_embeddings=False)
    started, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(s.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    mixture = [ex for task in TASKS for ex in pools[task]]
    log = {"base": train(model, mixture, s.pretrain_steps, s.pretrain_lr, s, s.seed)}
    save(model, work / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, task in enumerate(TASKS):
        model.load_state_dict(base_state)
        log[task] = train(model, pools[task], s.finetune_steps, s.finetune_lr, s, s.seed + 1 + i)
        save(model, work / f"ft_{task}")
    record = {"settings": asdict(s), "train_seconds": time.perf_counter() - started,
              "train_cpu_seconds": time.process_time() - cpu,
              "final_train_loss": {k: sum(v[-20:]) / len(v[-20:]) for k, v in log.items()}}
    stamp.write_text(json.dumps(record, indent=2))
    record["trained_now"] = True
    return record


def save(model: Any, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)


# ---------------------------------------------------------------- merges


def plans(work: Path, s: Settings) -> dict[str, dict]:
    """The merge plans, by row name. Sparsifying methods keep 20% of each task vector (density 0.2,
    as the SparseGPT comparison script uses) so the importance rankings are compared at one density."""
    base = str(work / "base")
    fts = [str(work / f"ft_{t}") for t in TASKS]
    calib = [{"data": str(work / "data" / f"{t}_train.txt"), "samples": 32, "seqlen": s.seqlen}
             for t in TASKS]

    def plan(method: str, params: dict, top: dict | None = None, with_base: bool = True,
             calibrated: bool = False) -> dict:
        models = [{"model": m, "parameters": dict(params), **({"calibration": c} if calibrated else {})}
                  for m, c in zip(fts, calib)]
        out = {"merge_method": method, "models": models, "dtype": "float32", "parameters": top or {}}
        return {**out, "base_model": base} if with_base else out

    ties = {"weight": 1.0, "density": 0.2}
    return {
        "linear": plan("linear", {"weight": 1.0}, with_base=False),
        "task_arithmetic": plan("task_arithmetic", {"weight": 0.3}),  # FusionBench's scaling factor
        "ties": plan("ties", ties),
        "dare_ties": plan("dare_ties", ties),
        "ties+wanda": plan("ties", ties, {"importance": "wanda"}, calibrated=True),
        "ties+sparsegpt": plan("ties", ties, {"importance": "sparsegpt"}, calibrated=True),
        "regmean": plan("regmean", {"weight": 1.0}, with_base=False, calibrated=True),
        "fisher": plan("fisher", {"weight": 1.0}, with_base=False, calibrated=True),
    }


DATA_AWARE = ("ties+wanda", "ties+sparsegpt", "regmean", "fisher")


def unavailable(plan: dict) -> str | None:
    """Why this streammerge cannot run ``plan`` (method or keys unknown), or None."""
    if plan["merge_method"] not in method_names():
        return f"no method {plan['merge_method']!r} in this streammerge"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_plan(plan, strict=True)
    except StreamMergeError as e:
        return str(e).splitlines()[0]
    return None


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def score(model_dir: Path, lines: list[str]) -> tuple[float, float]:
    """(loss, acc) of the model on the answer tokens of ``lines`` (see the module docstring)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seqs = [[BOS, *encode(line)] for line in lines]
    width = max(map(len, seqs))
    ids = torch.tensor([q + [PAD] * (width - len(q)) for q in seqs])  # right padding: causal, unseen
    logits = model(input_ids=ids).logits.float()
    nll_sum, correct, count = 0.0, 0, 0
    eq, end = VOCAB.index("="), VOCAB.index(END)
    for row, q in enumerate(seqs):
        start, stop = q.index(eq) + 1, q.index(end)  # answer positions start..stop-1
        pred = logits[row, start - 1:stop - 1]
        target = torch.tensor(q[start:stop])
        nll_sum += torch.nn.functional.cross_entropy(pred, target, reduction="sum").item()
        correct += int((pred.argmax(-1) == target).sum())
        count += len(target)
    return nll_sum / count, correct / count


# ---------------------------------------------------------------- report


def table(rows: dict[str, dict[str, tuple[float, float]]]) -> str:
    head = "| model | " + " | ".join(f"{t} loss / acc" for t in TASKS) + " | avg loss / acc |"
    lines = [head, "|" + "---|" * (len(TASKS) + 2)]
    for name, cells in rows.items():
        if not cells:
            lines.append(f"| {name} | " + " | ".join("n/a" for _ in range(len(TASKS) + 1)) + " |")
            continue
        vals = [cells[t] for t in TASKS]
        avg = (sum(v[0] for v in vals) / len(vals), sum(v[1] for v in vals) / len(vals))
        lines.append(f"| {name} | " + " | ".join(f"{lo:.3f} / {ac:.1%}" for lo, ac in [*vals, avg]) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, c in rows.items() if c]
    acc = [sum(rows[n][t][1] for t in TASKS) / len(TASKS) * 100 for n in names]
    loss = [sum(rows[n][t][0] for t in TASKS) / len(TASKS) for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["0.5" if n == "base" else "tab:blue" if n.startswith("ft ") or n == "individual"
              else "tab:orange" for n in names]
    a.bar(names, acc, color=colors)
    a.set_ylabel("average held-out answer-token accuracy (%)")
    b.bar(names, loss, color=colors)
    b.set_ylabel("average held-out answer-token loss (nats)")
    for ax in (a, b):
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.suptitle("4 synthetic tasks, tiny Llama: base, fine-tunes (blue), merges of the fine-tunes (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/streammerge-merge-quality"),
                    help="where data, models and merges go (models reused across runs)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: little data, a few steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path, help="default: WORK/merge_quality.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    print(f"streammerge from {Path(streammerge.__file__).parent}")
    started, cpu = time.perf_counter(), time.process_time()
    s = QUICK if args.quick else Settings()
    work = args.work / ("quick" if args.quick else "full")
    built = build_inputs(work, s)
    trained = (f"training {built['train_seconds']:.1f} s wall, {built['train_cpu_seconds']:.1f} s CPU"
               + ("" if built.get("trained_now") else " (models reused from an earlier run)"))
    print(trained)
    heldout = {t: (work / "data" / f"{t}_heldout.txt").read_text().splitlines() for t in TASKS}

    rows: dict[str, dict[str, tuple[float, float]]] = {}

    def evaluate(model_dir: Path) -> dict[str, tuple[float, float]]:
        return {t: score(model_dir, heldout[t]) for t in TASKS}

    rows["base"] = evaluate(work / "base")
    for t in TASKS:
        rows[f"ft {t}"] = evaluate(work / f"ft_{t}")
    rows["individual"] = {t: rows[f"ft {t}"][t] for t in TASKS}  # FusionBench's: each fine-tune on its task
    merge_seconds, notes = {}, {}
    for name, plan in plans(work, s).items():
        out = work / "merges" / name.replace("+", "_")
        t0 = time.perf_counter()
        try:
            if (why := unavailable(plan)) is None:
                streammerge.merge(plan, out, overwrite=True, quiet=True)
        except (StreamMergeError, ImportError) as e:
            if name not in DATA_AWARE:
                raise
            why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        if why is not None:
            print(f"{name}: not available yet ({why})")
            rows[name], notes[name] = {}, f"not available yet: {why}"
            continue
        merge_seconds[name] = time.perf_counter() - t0  # data-aware rows: calibration included
        rows[name] = evaluate(out)
    total, total_cpu = time.perf_counter() - started, time.process_time() - cpu

    print()
    print(table(rows))
    print()
    print("merge seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in merge_seconds.items()))
    print(f"total: {total:.1f} s wall, {total_cpu:.1f} s CPU, torch threads {args.threads}; {trained}")
    png = args.png or work / "merge_quality.png"
    plot(rows, png)
    print(f"plot: {png}")
    if args.json:
        args.json.write_text(json.dumps({"settings": asdict(s), "train": built, "rows": rows, "notes": notes,
                                         "merge_seconds": merge_seconds, "total_seconds": total,
                                         "total_cpu_seconds": total_cpu}, indent=2))


if __name__ == "__main__":
    main()
