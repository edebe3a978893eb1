"""--executor ray: a merge run as Ray tasks on a local multi-node cluster (a head and two worker
nodes of one CPU each, every node on 127.0.0.1) writes the same bytes as a local run, survives a
worker killed mid-write and a node removed mid-run, and fails for good in one line."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import torch
from click.testing import CliRunner

import streammerge
from checkpoint_builder import Family, write_checkpoint
from streammerge.cli import main
from streammerge.errors import MissingExtraError, PlanError, StreamMergeError
from hub_server import HubServer, hub, hub_environment  # noqa: F401 (a fixture)
from test_hub_budget import _budgeted, _local
from test_hub_stream import REPOS, _push, _shards
from test_tokenizer import _plan as _tokenizer_plan, models  # noqa: F401 (a fixture)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read on import: nodes on 127.0.0.1
try:
    import ray
except ImportError:
    ray = None

NODE = {"num_cpus": 1, "object_store_memory": 100 << 20}
TESTS = str(Path(__file__).parent)
CHILD = Path(__file__).with_name("crash_child.py")
# Node deaths noticed within about three seconds (Ray's defaults take about fifteen).
HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
          "health_check_failure_threshold": 3}
STARTUP_SECONDS = 120  # for tasks to start on every node (workers import torch on two cores)


@pytest.fixture(scope="module")
def cluster() -> Iterator:
    if ray is None:
        pytest.skip("ray is not installed (pip install 'streammerge[ray]')")
    from ray.cluster_utils import Cluster

    root = Path(tempfile.mkdtemp(prefix="smr", dir="/tmp"))  # short: Ray's socket paths fit 107 bytes
    (root / "ray").mkdir()
    env = {"RAY_TMPDIR": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={**NODE, "include_dashboard": False, "_system_config": HEALTH})
    try:
        for _ in range(2):
            c.add_node(**NODE)
        c.wait_for_nodes()
        ray.init(address=c.address)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _workers_with(cluster, hook: str | None, **env: str) -> Iterator[None]:
    """The driver reconnected so that every worker it starts has ``env`` and first runs
    ``ray_faults.<hook>``."""
    ray.shutdown()
    path = os.pathsep.join([TESTS, *sys.path])
    setup = {"worker_process_setup_hook": f"ray_faults.{hook}"} if hook else {}
    ray.init(address=cluster.address, runtime_env={**setup, "env_vars": {"PYTHONPATH": path, **env}})
    try:
        yield
    finally:
        ray.shutdown()
        ray.init(address=cluster.address)


def _ties(family: Family, **extra) -> dict:
    return {"merge_method": "ties", "base_model": str(family.base), "dtype": "float32",
            "shard_size": 20_000, "chunk_size": 7 * 32,  # several shards, several chunks per tensor
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}}
                       for m in family.models]} | extra


def _files(out: Path) -> dict[str, bytes]:
    """Every output file but merge_config.json, which holds the time of the run."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "merge_config.json"}


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.streammerge-partial"


@pytest.fixture(scope="module")
def adapter(fp32_family: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA adapter of the family's first fine-tune, every factor random."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_pretrained(fp32_family.models[0], dtype=torch.float32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    out = tmp_path_factory.mktemp("adapter")
    lora.save_pretrained(out)
    return out


def _case(case: str, family: Family, adapter: Path, models: dict) -> dict:
    shards = {"shard_size": 20_000}
    if case == "ties":
        return _ties(family)
    if case == "dare_ties":
        return _ties(family, merge_method="dare_ties", seed=7)
    if case == "slerp":
        return {"merge_method": "slerp", "base_model": str(family.base), "dtype": "float32",
                "parameters": {"t": [0.0, 0.3, 0.8]},
                "models": [{"model": str(family.base)}, {"model": str(family.models[0])}]} | shards
    if case == "lora fold":
        return {"merge_method": "linear", "dtype": "float32",
                "models": [{"model": f"{family.models[0]}+{adapter}", "parameters": {"weight": 0.6}},
                           {"model": str(family.models[1]), "parameters": {"weight": 0.4}}]} | shards
    return _tokenizer_plan(models, [1, 1, 1], tokenizer_source="union") | {"shard_size": 10_000}


@pytest.mark.parametrize("case", ["ties", "dare_ties", "slerp", "lora fold", "tokenizer union"])
def test_the_same_bytes_as_a_local_run(case: str, cluster, fp32_family: Family, adapter: Path,
                                       models: dict, tmp_path: Path) -> None:
    plan = _case(case, fp32_family, adapter, models)
    streammerge.merge(plan, tmp_path / "local", quiet=True)
    result = streammerge.merge(plan, tmp_path / "ray", quiet=True, executor="ray")
    assert result.shards > 2 and len(result.tasks) == result.shards
    assert sorted(s for t in result.tasks for s in t.shards) == sorted(
        p.name for p in (tmp_path / "ray").glob("*.safetensors"))
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert not _staging(tmp_path / "ray").exists()


def test_tasks_run_on_several_nodes_and_the_summary_says_so(cluster, fp32_family: Family,
                                                             tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(json.dumps(_ties(fp32_family, shard_size=8_000)))  # JSON is YAML
    streammerge.merge(plan, tmp_path / "local", quiet=True)
    run = CliRunner().invoke(main, ["run", str(plan), str(tmp_path / "ray"), "--executor", "ray",
                                    "--shards-per-task", "2"])
    assert run.exit_code == 0, run.output
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    shards = len(list((tmp_path / "ray").glob("*.safetensors")))
    assert f"{-(-shards // 2)} Ray task(s) on " in run.output and "median s/task" in run.output
    result = streammerge.merge(plan, tmp_path / "again", quiet=True, executor="ray")
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len({t.node for t in result.tasks}) > 1 and {t.node for t in result.tasks} <= alive
    assert all(t.host == "127.0.0.1" for t in result.tasks)


def test_a_worker_killed_mid_write_is_retried_and_resumes(cluster, fp32_family: Family,
                                                          tmp_path: Path) -> None:
    plan = _ties(fp32_family)
    streammerge.merge(plan, tmp_path / "local", quiet=True)
    sched = streammerge.schedule(plan)
    try:  # in the middle of the second tensor of the second shard
        first, second = [j for j in sched.jobs if j.shard == 1][:2]
        assert second.rows > second.rows_per_chunk
        at, shard = -(-first.rows // first.rows_per_chunk) + 1, sched.shards[1].filename
    finally:
        sched.close()
    marker = tmp_path / "crashed"
    with _workers_with(cluster, "exit_mid_write", SMR_CRASH_MARKER=str(marker), SMR_CRASH_SHARD=shard,
                       SMR_CRASH_AT=str(at)):
        result = streammerge.merge(plan, tmp_path / "ray", quiet=True, executor="ray")
    assert marker.exists()  # a worker did exit there
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    retried = next(t for t in result.tasks if shard in t.shards)
    assert retried.resumed == 1  # its journal: the first tensor was written and checked, not redone


def test_a_node_removed_mid_run_is_survived(cluster, fp32_family: Family, tmp_path: Path) -> None:
    """The run finishes on the other nodes, or, should Ray give a task up, fails in one line and
    resumes; either way the output is the local run's."""
    plan = _ties(fp32_family, shard_size=8_000)
    streammerge.merge(plan, tmp_path / "local", quiet=True)
    victim = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    outcome: dict = {}

    def merge() -> None:
        try:
            outcome["result"] = streammerge.merge(plan, tmp_path / "ray", quiet=True, executor="ray")
        except StreamMergeError as e:  # handed to the test thread
            outcome["error"] = e

    trace = tmp_path / "writing"
    trace.mkdir()
    with _workers_with(cluster, "slow_writes", SMR_WRITE_SECONDS="0.3", SMR_TRACE_DIR=str(trace)):
        thread = threading.Thread(target=merge)
        thread.start()
        deadline = time.monotonic() + STARTUP_SECONDS
        while not any(trace.glob(f"{victim.node_id}.*")):  # a task is writing on the victim
            assert time.monotonic() < deadline and thread.is_alive(), "no task ran on the new node"
            time.sleep(0.02)
        started_there = {p.name.split(".", 1)[1] for p in trace.glob(f"{victim.node_id}.*")}
        cluster.remove_node(victim, allow_graceful=False)
        thread.join(timeout=300)
    assert not thread.is_alive()
    if "error" in outcome:
        message = str(outcome["error"])
        assert "\n" not in message and "the partial output is kept in" in message, message
        result = streammerge.merge(plan, tmp_path / "ray", quiet=True, executor="ray")
        assert any(t.resumed for t in result.tasks)
    else:  # a task the victim was running may still have reported (workers report to the driver
        # directly); none started there after it went, and the others finished the run
        nodes = {s: t.node for t in outcome["result"].tasks for s in t.shards}
        assert {s for s, n in nodes.items() if n == victim.node_id} <= started_there, nodes
        assert len(set(nodes.values()) - {victim.node_id}) >= 2
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


@pytest.mark.parametrize("resumed_by", ["the same command", "the local executor"])
def test_a_killed_driver_resumes(resumed_by: str, cluster, fp32_family: Family, tmp_path: Path) -> None:
    plan = _ties(fp32_family)
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps(plan | {"executor": "ray", "ray_address": cluster.address}))  # JSON is YAML
    streammerge.merge(plan, tmp_path / "local", quiet=True)
    child = subprocess.run([sys.executable, str(CHILD), str(path), str(tmp_path / "ray"), "task", "1"],
                           capture_output=True, text=True, timeout=STARTUP_SECONDS)
    assert child.returncode == -9, child.stderr[-2000:]  # killed once the first task was done
    assert not (tmp_path / "ray").exists() and _staging(tmp_path / "ray").is_dir()
    if resumed_by == "the local executor":  # the task journals count as the run's own
        path.write_text(json.dumps(plan))
    run = CliRunner().invoke(main, ["run", str(path), str(tmp_path / "ray")])
    assert run.exit_code == 0, run.output
    assert re.search(r"resumed: [1-9]\d* of \d+ tensors", run.output)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


@pytest.mark.parametrize("reads", ["downloads", "stream_inputs"])
def test_tasks_read_hub_inputs(reads: str, cluster, hub: HubServer, sharded_family: Family,
                               tmp_path: Path) -> None:
    """Hub models through a cache every node sees: each task downloads the shards its tensors
    read (several at once into one cache), or reads them by range requests."""
    _push(hub, sharded_family)
    local = _local(sharded_family, tmp_path / "local")
    plan = _budgeted(*REPOS, stream_inputs=reads == "stream_inputs")
    with _workers_with(cluster, None, **hub_environment(hub, tmp_path / "hf_home")):
        result = streammerge.merge(plan, tmp_path / "ray", quiet=True, executor="ray")
    assert len({t.node for t in result.tasks}) > 1
    assert _shards(tmp_path / "ray") == local


def test_without_a_cluster_the_run_starts_one_and_stops_it(fp32_family: Family, tmp_path: Path) -> None:
    if ray is None:
        pytest.skip("ray is not installed (pip install 'streammerge[ray]')")
    plan = tmp_path / "plan.yaml"
    plan.write_text(json.dumps(_ties(fp32_family)))
    streammerge.merge(plan, tmp_path / "local", quiet=True)
    temp = Path(tempfile.mkdtemp(prefix="smr", dir="/tmp"))  # short, and only this run's
    (temp / "ray").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp)}
    try:
        run = subprocess.run([sys.executable, "-m", "streammerge", "run", str(plan), str(tmp_path / "ray"),
                              "--executor", "ray"], capture_output=True, text=True, env=env,
                             timeout=STARTUP_SECONDS)
        assert run.returncode == 0, run.stderr[-3000:]
        assert re.search(r"Ray task\(s\) on 1 node\(s\)", run.stderr)
        assert _files(tmp_path / "ray") == _files(tmp_path / "local")
        left = [p.pid for p in psutil.process_iter(["cmdline"])
                if str(temp) in " ".join(p.info["cmdline"] or [])]
        assert not left, f"Ray processes left running: {left}"
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _with_nan(family: Family, root: Path, tensor: str) -> Path:
    tensors = dict(family.tensors[family.models[0]])
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor].view(-1)[5] = float("nan")
    return write_checkpoint(root, tensors, family.arch.config(torch.float32))


def test_a_task_that_fails_stops_the_run_in_one_line_and_resumes(cluster, fp32_family: Family,
                                                                 tmp_path: Path) -> None:
    tensor = "model.layers.1.mlp.down_proj.weight"
    nan = _with_nan(fp32_family, tmp_path / "nan", tensor)
    half = {"weight": 0.5, "density": 0.5}
    plan = _ties(fp32_family) | {"models": [{"model": str(nan), "parameters": half},
                                            {"model": str(fp32_family.models[1]), "parameters": half}]}
    sched = streammerge.schedule(plan)
    shard = sched.shards[next(j.shard for j in sched.jobs if j.name == tensor)].filename
    sched.close()
    with pytest.raises(StreamMergeError) as failed:
        streammerge.merge(plan, tmp_path / "ray", quiet=True, executor="ray")
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"shard {shard}: {nan}/model.safetensors: tensor {tensor!r} holds NaN")
    assert f"the partial output is kept in {_staging(tmp_path / 'ray')}" in message
    assert not (tmp_path / "ray").exists() and _staging(tmp_path / "ray").is_dir()

    streammerge.merge(plan, tmp_path / "local", quiet=True, allow_nonfinite=True)
    streammerge.merge(plan, tmp_path / "ray", quiet=True, executor="ray", allow_nonfinite=True)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


def test_without_ray_one_line_says_what_to_install(fp32_family: Family, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as where it is not installed
    with pytest.raises(MissingExtraError, match=r"needs Ray: pip install 'streammerge\[ray\]'"):
        streammerge.merge(_ties(fp32_family), tmp_path / "out", quiet=True, executor="ray")


@pytest.mark.parametrize("options, problem", [
    ({"ray_address": "127.0.0.1:6379"}, "apply to executor: ray"),
    ({"shards_per_task": 2}, "apply to executor: ray"),
    ({"executor": "ray", "disk_budget": "1GB"}, "budget one machine's downloads"),
    ({"executor": "ray", "adapter_output": {"combination": "cat"}}, "adapter_output writes one adapter"),
])
def test_options_that_do_not_go_together_are_refused(options: dict, problem: str, fp32_family: Family,
                                                     tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=problem):
        streammerge.merge(_ties(fp32_family) | options, tmp_path / "out", quiet=True)
