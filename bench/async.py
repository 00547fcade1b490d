"""Asynchronous GRPO on this machine: steps/s, samples/s and held-out accuracy at rollout.max_staleness 0, 1 and 2,
then the speed-up those phase times project for separate rollout and trainer GPUs (bench/async_sim.py).

    python bench/async.py [--steps 150] [--start DIR] [--out runs/bench_async] [--warmup 2] [--comm 0.1]
                          [--precision auto|float32|bfloat16]

One run, the embedded default model of recipes/quickstart.yaml:
1. the starting checkpoint: the quickstart's SFT and DPO stages, written to OUT/start (OUT/start_float32 with
   `--precision float32`; reused when its checkpoints/02_dpo exists), or `--start DIR`, e.g.
   runs/quickstart/checkpoints/02_dpo. `--precision` sets trainer.dtype, ref.dtype and rollout.dtype in every run;
   `auto` (default) keeps the recipe's own `auto`: bf16 where this machine computes it natively, else float32;
2. the quickstart's GRPO stage (its steps, batch size and lr; `--steps` sets the steps) from that checkpoint, three
   times: rollout.max_staleness=0, 1 and 2. All three set algo.tis_cap=2.0, which off-policy training needs, so
   that only the staleness differs (at 0 the engine samples from the trainer's own weights and the truncated
   importance weights correct only the engine/trainer mismatch, about 1). Each is `python -m rlkit.run
   OUT/recipes/grpo.yaml key=value ...` in a subprocess, with W&B disabled and a metrics line every step.
Measured per run, over the steps from `--warmup` on:
- steps/s: steps over the wall-clock time between their metrics lines, as the run writes them (this process
  watches RUN_DIR/metrics.jsonl); samples/s = steps/s x prompts x group size;
- seconds per phase: the mean of `grpo/time/<phase>`. With N >= 1, generate and score are those of the batches
  sampled while the step ran (beside the update, not before it), and `wait` is the trainer's time blocked on
  experience (`grpo/async/wait_seconds`), `lag` the mean policy lag of the samples (`grpo/async/staleness`);
- held-out accuracy (greedy, the quickstart's 500 problems) before and after the stage, from RUN_DIR/summary.json.
Then the staleness-0 run's mean phase times, one engine and one trainer rank, feed async_sim, which projects
steps/s for 1+1, 4+4 and 16+16 rollout+trainer GPUs at N = 0, 1, 2 (the GRPO stage's single-pass update takes
its proximal log-probs from its own forward, so an off-policy step costs no extra forward). This machine's CPU
cores serve the engine, the trainer and the reward workers at once, so its own ratios show what overlap buys when
both sides share the cores, not what separate GPUs would give: that is the projection's job.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.async_sim import COMM, PhaseTimes, format_table, project  # noqa: E402

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
STALENESS = (0, 1, 2)
TIS_CAP = 2.0
PHASES = ("generate", "score", "reference", "train", "weight_sync")
STEP_KEY = "grpo/time/train"  # every GRPO step's metrics line has it


def quickstart_stages() -> tuple[dict, dict]:
    """recipes/quickstart.yaml without its stages, and its stages by kind."""
    recipe = yaml.safe_load(QUICKSTART.read_text())
    return recipe, {s["kind"]: s for s in recipe.pop("stages")}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def rlkit_run(recipe: Path, run_dir: Path, overrides: list[str]) -> list[tuple[float, dict]]:
    """`python -m rlkit.run RECIPE ...` into a fresh `run_dir` (its console in `<run_dir>.log`). Returns each GRPO
    step's metrics line with the wall-clock time it appeared, polled every 50 ms while the run goes."""
    shutil.rmtree(run_dir, ignore_errors=True)
    console = run_dir.with_name(run_dir.name + ".log")
    command = [sys.executable, "-m", "rlkit.run", str(recipe), f"logging.output_dir={run_dir}",
               "logging.wandb_mode=disabled", "logging.log_every=1", *overrides]
    print("$", " ".join(command[1:]), flush=True)
    steps, offset, partial = [], 0, ""
    with console.open("w") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                finished = proc.poll() is not None
                metrics = run_dir / "metrics.jsonl"
                if metrics.exists():
                    with metrics.open() as f:
                        f.seek(offset)
                        partial += f.read()
                        offset = f.tell()
                    now = time.perf_counter()
                    *lines, partial = partial.split("\n")
                    steps += [(now, row) for row in map(json.loads, lines) if STEP_KEY in row]
                if finished:
                    break
                time.sleep(0.05)
        finally:  # interrupted: the run goes too
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    if proc.returncode:
        tail = "\n".join(console.read_text().splitlines()[-15:])
        raise SystemExit(f"{' '.join(command[1:])} failed (exit {proc.returncode}); the end of {console}:\n{tail}")
    return steps


def start_checkpoint(out: Path, start_recipe: Path, given: str, precision: str) -> str:
    """`--start`, else OUT/start's (OUT/start_<precision>'s) DPO checkpoint, made by the quickstart's SFT and DPO
    stages unless it exists."""
    if given:
        return str(Path(given).resolve())
    folder = out / ("start" if precision == "auto" else f"start_{precision}")
    checkpoint = folder / "checkpoints" / "02_dpo"
    if (checkpoint / "config.json").exists():
        print(f"starting checkpoint: {checkpoint} (reused)", flush=True)
    else:
        rlkit_run(start_recipe, folder, [])
    return str(checkpoint.resolve())


def measure(steps: list[tuple[float, dict]], warmup: int, samples_per_step: int) -> dict:
    """Steps/s and samples/s between the metrics lines of step `warmup` and the last; mean phase seconds."""
    if len(steps) < warmup + 2:
        raise SystemExit(f"{len(steps)} steps logged; need --steps of at least {warmup + 2} (--warmup {warmup})")
    timed = steps[warmup:]
    rate = (len(timed) - 1) / (timed[-1][0] - timed[0][0])
    rows = [row for _, row in timed]

    def mean(key: str) -> float | None:
        values = [row[key] for row in rows if row.get(key) is not None]
        return statistics.fmean(values) if values else None

    phases = {name: mean(f"grpo/time/{name}") or 0.0 for name in PHASES}
    return {"steps_per_s": rate, "samples_per_s": rate * samples_per_step, "steps": len(timed), "phases": phases,
            "wait": mean("grpo/async/wait_seconds"), "lag": mean("grpo/async/staleness")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the quickstart's)")
    parser.add_argument("--start", default="", help="a checkpoint folder to start GRPO from (default: SFT + DPO)")
    parser.add_argument("--out", default="runs/bench_async", help="where the runs go")
    parser.add_argument("--warmup", type=int, default=2, help="first GRPO steps left out of the timings")
    parser.add_argument("--comm", type=float, default=COMM, help="async_sim: gradient all-reduce / 1-rank train time")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="trainer, reference and engine dtype in every run (auto: bf16 where native, else float32)")
    args = parser.parse_args()
    from rlkit.kernels.precision import describe_machine

    print(describe_machine(), flush=True)  # the numbers below depend on it (native bf16 or not)
    out = (REPO / args.out).resolve()
    base, stages = quickstart_stages()
    if args.precision != "auto":
        base |= {k: base.get(k, {}) | {"dtype": args.precision} for k in ("trainer", "ref", "rollout")}
    stage = stages["grpo"] | ({"steps": args.steps} if args.steps else {})
    start = start_checkpoint(out, write_recipe(out / "recipes" / "start.yaml",
                                               base | {"stages": [stages["sft"], stages["dpo"]]}), args.start,
                             args.precision)
    model = base.get("model", {}) | {"path": start}
    recipe = write_recipe(out / "recipes" / "grpo.yaml", base | {"model": model, "stages": [stage]})
    results = {}
    for n in STALENESS:
        run_dir = out / f"staleness_{n}"
        steps = rlkit_run(recipe, run_dir, [f"rollout.max_staleness={n}", f"algo.tis_cap={TIS_CAP}"])
        resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())  # auto resolved to a dtype there
        group, dtype = resolved["algo"]["group_size"], resolved["trainer"]["dtype"]
        (grpo,) = json.loads((run_dir / "summary.json").read_text())["stages"]
        results[n] = measure(steps, args.warmup, stage["batch_size"] * group) | {
            "before": grpo["before"]["accuracy"], "after": grpo["after"]["accuracy"]}
    # a single-pass update's own forward gives the decoupled objective its proximal log-probs: no extra forward
    phases = PhaseTimes(**results[0]["phases"])
    projections = project(phases, comm=args.comm)
    (out / "results.json").write_text(json.dumps(
        {"start": start, "stage": stage, "dtype": dtype, "tis_cap": TIS_CAP, "warmup": args.warmup, "runs": results,
         "projection": [asdict(p) for p in projections], "comm": args.comm}, indent=2))
    report(start, stage, group, dtype, args.warmup, results, phases, projections, args.comm)
    print(f"\nnumbers in {out / 'results.json'}")


def report(start: str, stage: dict, group: int, dtype: str, warmup: int, results: dict, phases: PhaseTimes,
           projections, comm: float) -> None:
    base = results[0]
    print(f"\nGRPO stage of recipes/quickstart.yaml from {start}: {stage['steps']} steps x {stage['batch_size']} "
          f"prompts x {group} samples, lr {stage['lr']}, {dtype}, algo.tis_cap={TIS_CAP} in every run; "
          f"timings over steps {warmup}..{stage['steps'] - 1}, seconds per step")
    print(f"{'staleness':>9s} {'steps/s':>8s} {'samples/s':>9s} {'ratio':>6s} {'generate':>8s} {'score':>6s} "
          f"{'ref':>6s} {'train':>6s} {'sync':>6s} {'wait':>6s} {'lag':>5s} {'acc before':>10s} {'after':>6s}")
    for n, r in results.items():
        p, ratio = r["phases"], r["steps_per_s"] / base["steps_per_s"]
        wait, lag = (f"{r[k]:{w}.3f}" if r[k] is not None else f"{'-':>{w}s}" for k, w in (("wait", 6), ("lag", 5)))
        print(f"{n:9d} {r['steps_per_s']:8.3f} {r['samples_per_s']:9.1f} {ratio:5.2f}x {p['generate']:8.3f} "
              f"{p['score']:6.3f} {p['reference']:6.3f} {p['train']:6.3f} {p['weight_sync']:6.3f} {wait} {lag} "
              f"{r['before']:10.3f} {r['after']:6.3f}")
    gap = results[1]["after"] - base["after"]
    print(f"held-out accuracy after GRPO, staleness 1 - staleness 0: {gap:+.3f} (goal: within 0.02: "
          f"{'met' if abs(gap) <= 0.02 else 'not met'})")
    print(f"\nprojected with bench/async_sim.py from the staleness-0 run's phase times (1 engine + 1 trainer rank: "
          f"generate {phases.generate:.3f}, score {phases.score:.3f}, reference {phases.reference:.3f}, train "
          f"{phases.train:.3f}, weight_sync {phases.weight_sync:.3f} s; all-reduce comm={comm})")
    print(format_table(projections))


if __name__ == "__main__":
    main()
