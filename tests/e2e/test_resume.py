"""Checkpoint and resume for real: a run is killed (SIGKILL to its whole process group, vLLM included) in the
middle of its GRPO stage, which starts from the SFT model again (`start: 01_sft`), then `resume=auto` finishes it.
The resumed run must continue from the same step and end exactly where an uninterrupted run of the same recipe
ends.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.test_quickstart import FLOAT32, REPO, read_metrics, run, step_metrics

GRPO_STEPS = 20  # killed at step 10 or later (a resume point every 5 steps): at least 5 steps run after the resume
OVERRIDES = [
    "logging.wandb_mode=offline",
    *FLOAT32,
    "logging.log_every=1",
    "data.num_eval=40",  # the runs are compared with each other, not with a bar: a small held-out set does
    "checkpoint.every=5",
    # GRPO branches back to the SFT model (`start`), so the resumed run must take its policy, and its reference, from
    # the resume point, not from the stage before it (DPO)
    "stages=[{kind: sft, steps: 60, batch_size: 32, lr: 1.0e-3}, {kind: dpo, steps: 10, batch_size: 8, lr: 1.0e-4},"
    f" {{kind: grpo, start: 01_sft, steps: {GRPO_STEPS}, batch_size: 4, lr: 1.0e-4}}]",
]


def latest_point(run_dir):
    pointer = run_dir / "checkpoints" / "resume" / "latest"
    if not pointer.exists():
        return None
    return json.loads((pointer.parent / pointer.read_text().strip() / "state.json").read_text())


def kill_in_grpo(run_dir, min_step: int) -> subprocess.Popen:
    """Start the run and SIGKILL its process group once a resume point inside GRPO (stage 2) exists."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlkit.run", "recipes/quickstart.yaml", f"logging.output_dir={run_dir}", *OVERRIDES],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        state = latest_point(run_dir)
        if state and state["stage"] == 2 and state["step"] >= min_step:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    return proc


@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_run(tmp_path):
    full_dir, run_dir = tmp_path / "full", tmp_path / "killed"
    proc = kill_in_grpo(run_dir, min_step=10)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-GRPO: {proc.stderr.read()[-3000:]}"
    assert not (run_dir / "summary.json").exists()
    point = latest_point(run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = [json.loads(line) for line in lines if json.loads(line)["step"] <= point["global_step"]]

    resumed = run("recipes/quickstart.yaml", f"logging.output_dir={run_dir}", *OVERRIDES, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming {run_dir} at stage 2, step {point['step']}" in resumed.stdout

    # the metrics continue from the resume point: nothing logged before it is lost, nothing is logged twice
    metrics = read_metrics(run_dir)
    assert metrics[: len(kept)] == kept
    grpo_steps = [m["step"] for m in metrics if "grpo/loss" in m]
    assert grpo_steps == list(range(grpo_steps[0], grpo_steps[0] + GRPO_STEPS)), "GRPO steps skipped or repeated"
    orphaned = run_dir / "metrics.orphaned.jsonl"  # what the killed run logged after its last resume point
    assert orphaned.read_text().splitlines() == lines[len(kept):] if len(lines) > len(kept) else not orphaned.exists()

    # every stage checkpoint is there, and the resume points stay within checkpoint.keep
    for name in ("00_init", "01_sft", "02_dpo", "03_grpo"):
        assert (run_dir / "checkpoints" / name / "model.safetensors").exists(), name
    points = [p.name for p in (run_dir / "checkpoints" / "resume").iterdir() if p.is_dir()]
    assert len(points) == 2 and not any(p.endswith(".tmp") for p in points), points

    # the same recipe without the kill ends at the same place
    full = run("recipes/quickstart.yaml", f"logging.output_dir={full_dir}", *OVERRIDES)
    assert full.returncode == 0, full.stderr[-4000:]
    expected = step_metrics(full_dir, ("grpo/",))
    got = {key: value for key, value in step_metrics(run_dir, ("grpo/",)).items() if key in expected}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    summaries = [json.loads((d / "summary.json").read_text())["stages"] for d in (run_dir, full_dir)]
    assert [s["after"] for s in summaries[0]] == [s["after"] for s in summaries[1]]
    for sft, _, grpo in summaries:  # GRPO's `before` is the SFT model's evaluation
        assert grpo["before"] == sft["after"], (sft, grpo)
    # the uninterrupted run switched to the SFT model; the resumed one took it from the resume point instead
    assert "stage 2: starts from 01_sft" in full.stdout and "starts from" not in resumed.stdout

    # a finished run has nothing to resume
    again = run("recipes/quickstart.yaml", f"logging.output_dir={run_dir}", *OVERRIDES, "resume=auto", timeout=300)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_resume_refuses_a_changed_recipe(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "resume" / "step_0000000_stage").mkdir(parents=True)
    (run_dir / "checkpoints" / "resume" / "step_0000000_stage" / "state.json").write_text(json.dumps({"stage": 0}))
    (run_dir / "checkpoints" / "resume" / "latest").write_text("step_0000000_stage")
    proc = run("recipes/quickstart.yaml", f"logging.output_dir={run_dir}", "--print-config", timeout=120)
    (run_dir / "recipe.yaml").write_text(proc.stdout)
    proc = run("recipes/quickstart.yaml", f"logging.output_dir={run_dir}", "resume=auto", "trainer.lr=0.5",
               timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "resume: the recipe differs" in proc.stderr and "trainer.lr" in proc.stderr


def test_resume_refuses_a_run_dir_without_a_resume_point(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    proc = run("recipes/quickstart.yaml", f"logging.output_dir={tmp_path}", "resume=auto", timeout=120)
    assert proc.returncode == 2 and "has no resume point" in proc.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
