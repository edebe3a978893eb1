"""ChunkWorkers: results in order, a bounded number of items taken, errors raised, torch on one
thread in the workers; and the schedule's share of a large tensor for each worker."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch

import streammerge
from checkpoint_builder import Arch, write_family
from streammerge.schedule import describe
from streammerge.workers import ChunkWorkers, chunk_workers, in_flight


@pytest.mark.parametrize("n", [1, 2, 3])
def test_results_come_in_order_with_a_bounded_number_taken(n: int) -> None:
    rng = random.Random(n)
    delays = [rng.random() / 500 for _ in range(40)]
    taken = handed = 0
    most = 0

    def items():
        nonlocal taken, most
        for i in range(len(delays)):
            taken += 1
            most = max(most, taken - handed)
            yield i

    def work(i: int) -> tuple[int, str]:
        time.sleep(delays[i])  # later items often finish first
        return i * i, threading.current_thread().name

    workers = ChunkWorkers(n)
    try:
        names = set()
        out = []
        for value, name in workers.map(work, items()):
            handed += 1
            out.append(value)
            names.add(name)
    finally:
        workers.close()
    assert out == [i * i for i in range(len(delays))]
    assert most == in_flight(n)
    assert len(names) == n if n > 1 else names == {threading.current_thread().name}


def test_an_error_in_a_worker_is_raised_and_later_items_are_not_taken() -> None:
    taken = []

    def items():
        for i in range(100):
            taken.append(i)
            yield i

    def work(i: int) -> int:
        if i == 5:
            raise ValueError("chunk 5 failed")
        return i

    workers = ChunkWorkers(2)
    try:
        got = []
        with pytest.raises(ValueError, match="chunk 5 failed"):
            for value in workers.map(work, items()):
                got.append(value)
    finally:
        workers.close()
    assert got == [0, 1, 2, 3, 4]
    assert len(taken) <= 5 + in_flight(2)


def test_workers_run_torch_on_one_thread_and_the_count_comes_back() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with chunk_workers(2) as workers:
            inside = list(workers.map(lambda _: torch.get_num_threads(), range(4)))
            main = torch.get_num_threads()
        assert inside == [1, 1, 1, 1] and main == 1
        assert torch.get_num_threads() == 2
        with chunk_workers(1):
            assert torch.get_num_threads() == 2  # one worker: torch's own threads, as before
    finally:
        torch.set_num_threads(before)


def test_every_worker_gets_a_share_of_a_large_tensor(tmp_path: Path) -> None:
    """With two workers a tensor of 2^20 elements or more is cut into two chunks or more, even
    when the budget would fit it whole; with one, it stays whole."""
    family = write_family(tmp_path, Arch(hidden=256, intermediate=4096, layers=1), n=2, dtype=torch.bfloat16)
    plan = {"merge_method": "ties", "base_model": str(family.base), "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in family.models]}
    before = torch.get_num_threads()
    try:
        chunks = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            sched = streammerge.schedule(plan, max_memory="8G")
            try:
                job = next(j for j in sched.jobs if j.name == "model.layers.0.mlp.up_proj.weight")
                chunks[n] = -(-job.rows // job.rows_per_chunk)
                assert sched.workers == n
                assert f"workers       {n} chunk" in describe(sched)
            finally:
                sched.close()
    finally:
        torch.set_num_threads(before)
    assert chunks == {1: 1, 2: 2}
