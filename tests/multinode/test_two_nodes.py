"""rlkit on a Ray cluster of two nodes (tests/multinode/world.py): the driver on the head joins the cluster by
cluster.address, the worker node has its own network, /tmp and /dev/shm, and sees only the shared run storage.

What the world showed of rlkit before it could run on several nodes (each fixed, and tested here or in
tests/runtime/test_cluster.py): a rank on the worker node, told MASTER_ADDR=127.0.0.1, dialled its own loopback
and the group hung until the timeout; a rank on the worker node given the driver's node-local checkpoint
(`checkpoints/00_init` under a /tmp run folder) failed in transformers ("Repo id must be in the form ..."), as it
took the missing path for a hub id; `ray.init(num_cpus=...)` on the head, without RAY_ADDRESS, started a second,
one-node Ray of its own beside the running cluster instead of joining it.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.test_quickstart import FLOAT32, REPO, run, step_metrics
from tests.e2e.test_resume import latest_point

FAST = ["logging.wandb_mode=disabled", "data.num_eval=20",
        "stages=[{kind: sft, steps: 2, batch_size: 8}]"]


def rlkit_run(world, *args, timeout=600):
    return world.head.run([sys.executable, "-m", "rlkit.run", "recipes/quickstart_ray.yaml",
                           f"cluster.address={world.address}", *args], cwd=REPO, timeout=timeout, check=False)


def test_world_nodes_are_apart(world):
    """The worker node has its own loopback, hostname and /tmp: the head's node-local folder is not there, the
    shared storage is."""
    (world.local / "mark").write_text("head")
    (world.shared / "mark").write_text("shared")
    seen = world.worker.sh(f"hostname; cat {world.shared}/mark; echo; test -e {world.local}/mark || echo no-local; "
                           f"ip -o -4 addr show scope global | wc -l")
    assert seen.split() == ["rkworker", "shared", "no-local", "1"]


JOIN = """
import os, sys, ray
from rlkit.runtime.cluster import Cluster
from rlkit.recipe import ClusterConfig, RecipeConfig

class Env:  # an actor made as rlkit makes its workers, with an env var of its own (as the trainer ranks' rendezvous)
    def get(self, key):
        return os.environ.get(key)

c = ClusterConfig(backend="ray", address=sys.argv[1], runtime_env={"env_vars": {"RLKIT_MARK": "every actor"}})
cluster = Cluster(RecipeConfig(cluster=c))
other = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == sys.argv[2]]
actor = cluster._actor(Env, 0.1, 0, {"OWN": "mine"}).options(
    scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(other[0], soft=False)).remote()
print(len(ray.nodes()), ray.cluster_resources()["CPU"], ray.get(actor.get.remote("RLKIT_MARK")),
      ray.get(actor.get.remote("OWN")))
"""


def test_cluster_address_joins_and_runtime_env_reaches_actors_on_the_other_node(world):
    """cluster.address joins the running cluster as it is (no second Ray, no resources passed); cluster.runtime_env's
    variables reach an actor on the worker node, merged with the actor's own."""
    proc = world.head.run([sys.executable, "-c", JOIN, world.address, world.worker.ip], cwd=REPO, timeout=180,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == f"2 {2 * world.cpus:.1f} every actor mine"


def test_an_output_dir_the_worker_node_cannot_see_fails_in_one_line(world):
    run_dir = world.local / "run"
    proc = rlkit_run(world, f"logging.output_dir={run_dir}", *FAST, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: logging.output_dir: node {world.worker.ip} (rkworker) does not see '{run_dir}'"), \
        proc.stderr[-3000:]
    assert not run_dir.exists()  # nothing left behind


GRPO_STEPS = 4  # killed at step 2 (a resume point every 2 steps): 2 steps run after the resume
# short stages: the runs are compared with each other, not with a bar (most of their time is starting engines)
RECIPE = [*FLOAT32, "logging.wandb_mode=disabled", "logging.log_every=1", "data.num_eval=20", "checkpoint.every=2",
          f"stages=[{{kind: sft, steps: 16, batch_size: 32, lr: 1.0e-3}}, {{kind: grpo, steps: {GRPO_STEPS}, "
          "batch_size: 4, lr: 1.0e-4}]"]
SHOW = [*RECIPE, "cluster.placement=spread"]  # one trainer rank and one engine per node


def kill_in_grpo(world, run_dir, min_step: int, log) -> subprocess.Popen:
    """Start the run on the head and SIGKILL the driver once a resume point inside GRPO (stage 1) exists. Its console
    goes to the file `log` (a pipe nobody reads would fill up and stall it)."""
    proc = world.head.popen([sys.executable, "-m", "rlkit.run", "recipes/quickstart_ray.yaml",
                             f"cluster.address={world.address}", f"logging.output_dir={run_dir}", *SHOW], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        state = latest_point(run_dir)
        if state and state["stage"] == 1 and state["step"] >= min_step:
            os.killpg(proc.pid, signal.SIGKILL)  # nsenter and the driver under it
            break
        time.sleep(0.05)
    if proc.poll() is None and time.monotonic() >= deadline:  # never reached GRPO: stop it, the test fails
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return proc


@pytest.mark.slow
def test_two_nodes_end_like_one_node_after_a_driver_kill_and_resume(world, tmp_path):
    """The Ray quickstart on two nodes (a trainer rank and an engine on each: cluster.placement=spread), its driver
    SIGKILLed mid-GRPO and rerun with resume=auto, ends with the held-out accuracies and per-step SFT and GRPO
    metrics of the same recipe run uninterrupted in one process; its run folder is complete on the shared storage."""
    run_dir = world.shared / "two"
    with open(tmp_path / "killed.log", "w") as log:
        killed = kill_in_grpo(world, run_dir, 2, log)
    console = (tmp_path / "killed.log").read_text()
    assert killed.returncode == -signal.SIGKILL, f"not killed mid-GRPO: {console[-3000:]}"
    point = latest_point(run_dir)
    resumed = rlkit_run(world, f"logging.output_dir={run_dir}", *SHOW, "resume=auto", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming {run_dir} at stage 1, step {point['step']}" in resumed.stdout
    for worker in ("ShardedTrainer", "VllmRollout"):  # Ray prefixes a remote node's actor lines with its IP
        assert f"({worker} pid=" in resumed.stderr and f"ip={world.worker.ip})" in resumed.stderr, worker
    for name in ("00_init", "01_sft", "02_grpo"):
        assert (run_dir / "checkpoints" / name / "model.safetensors").exists(), name
    assert not list(run_dir.glob(".rlkit-storage-*"))

    # the reference: the same recipe uninterrupted in one process (recipes/quickstart.yaml is quickstart_ray.yaml
    # without its cluster section: one rank, one engine, no Ray). Two ranks end where one does up to float rounding
    # (tests/runtime/test_cluster.py), and engines split the prompts, not their seeds. Every SFT and GRPO metric is
    # compared, so the steps after the resume are checked by the policy's entropy and gradient norm, not only by
    # losses near 0 (the 16-step SFT model rarely answers right)
    one_dir = tmp_path / "one"
    one = run("recipes/quickstart.yaml", f"logging.output_dir={one_dir}", *RECIPE)
    assert one.returncode == 0, one.stderr[-4000:]
    summaries = [json.loads((d / "summary.json").read_text())["stages"] for d in (one_dir, run_dir)]
    assert [s["after"] for s in summaries[0]] == [s["after"] for s in summaries[1]]
    metrics = [step_metrics(d, ("sft/", "grpo/")) for d in (one_dir, run_dir)]
    assert metrics[0].keys() == metrics[1].keys()
    assert any(k == "grpo/entropy" and step > point["global_step"] for step, k in metrics[0])  # after the resume
    for key, value in metrics[0].items():
        assert metrics[1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
