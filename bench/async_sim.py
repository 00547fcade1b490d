"""Projected GRPO steps/s with R rollout GPUs and T trainer GPUs, on-policy or with a staleness bound N.

A small discrete-event simulation of the GRPO pipeline, fed by phase times measured with one engine and one
trainer rank (`bench/async.py` feeds it a `rollout.max_staleness=0` run's means). Pure Python, no torch:

    python bench/async_sim.py --generate 0.20 --score 0.02 --reference 0.03 --train 0.15 --weight-sync 0.02

Two resources, each taking one job at a time:
- the engines, which sample a step's batch (split evenly over R engines) and score it (on the CPUs of the
  engines' hosts, split the same way): `(generate + score) / R`;
- the trainer, which runs the reference forward and the update (split over T data-parallel ranks):
  `(reference + train) / T + comm * train * 2 (T - 1) / T`. The second term is the gradient all-reduce, not
  overlapped with the backward: a ring all-reduce moves 2 (T - 1) / T of the gradient's bytes per rank, and moving
  one gradient's worth is priced at `comm` times the one-rank train time (default 0.1, an assumption, not a
  measurement: the knob to turn for a slower interconnect). The reference forward has no all-reduce.
  When N >= 1 the update may also pay `proximal / T`: the decoupled objective's log-probs of the batch before
  the update, one more forward when the update takes several optimizer steps (algo.ppo_minibatches or ppo_epochs
  > 1; rlkit times it inside `reference`). A single-pass update, the default, uses its own forward: proximal = 0.
A weight sync (`weight_sync` seconds, the same for any R and T: a broadcast pipelines at link speed whatever the
number of receivers) follows every update and holds both resources: the engines stop for its duration, and it
starts only once the engines have finished the batch they are sampling (an engine batch comes from one policy
version, as rlkit's engine calls do). A sync waiting for the engines goes before their next batch.

Versions: the engines start at version 0 and hold version k + 1 once update k's sync ends; the trainer holds
version k when it updates on batch k. Batch k may start only when the engines hold version >= k - N, so no
batch is trained more than N versions after the one it was sampled from (its lag, `BatchTrace.lag`). N = 0 is
strict alternation: generate + score, then reference + train + sync, one after the other. N >= 1 lets the
engines sample batches t+1..t+N while the trainer updates on batch t.

Not modelled: time outside the timed phases (advantages, logging: the controller's own work), stragglers and
uneven lengths across engines (each engine takes exactly 1/R of the batch's time), engines that could be
interrupted mid-batch by a sync, and any change of the learning curve with staleness (steps/s only).
"""

from __future__ import annotations

import argparse
import heapq
from dataclasses import dataclass, field

GPUS = ((1, 1), (4, 4), (16, 16))  # (rollout, trainer) GPUs projected by default
STALENESS = (0, 1, 2)
COMM = 0.1  # one gradient all-reduce, as a fraction of the one-rank train time (assumed)


@dataclass(frozen=True)
class PhaseTimes:
    """Mean seconds per GRPO step of each phase, measured with one engine and one trainer rank (the names are
    rlkit's `<stage>/time/<phase>` metrics)."""

    generate: float
    score: float = 0.0
    reference: float = 0.0
    train: float = 0.0
    weight_sync: float = 0.0
    proximal: float = 0.0  # the extra policy forward of an off-policy step (N >= 1 only); not logged on its own

    @classmethod
    def from_metrics(cls, means: dict[str, float], prefix: str = "grpo") -> "PhaseTimes":
        """From `{"<prefix>/time/<phase>": seconds}`; a phase missing there counts 0.

        >>> PhaseTimes.from_metrics({"grpo/time/generate": 2.0, "grpo/time/train": 1.0, "grpo/loss": 9.0})
        PhaseTimes(generate=2.0, score=0.0, reference=0.0, train=1.0, weight_sync=0.0, proximal=0.0)
        """
        return cls(**{name: float(means.get(f"{prefix}/time/{name}", 0.0)) for name in cls.__dataclass_fields__})


def step_durations(phases: PhaseTimes, rollout_gpus: int, trainer_gpus: int, comm: float = COMM,
                   max_staleness: int = 0) -> tuple[float, float, float]:
    """(engine batch, trainer update, weight sync) seconds with R rollout and T trainer GPUs.

    >>> step_durations(PhaseTimes(generate=8.0, score=0.0, reference=1.0, train=3.0, weight_sync=0.5), 4, 2)
    (2.0, 2.3, 0.5)
    """
    r, t = rollout_gpus, trainer_gpus
    rollout = (phases.generate + phases.score) / r
    forward = phases.reference + (phases.proximal if max_staleness else 0.0)
    update = (forward + phases.train) / t + comm * phases.train * 2 * (t - 1) / t
    return rollout, update, phases.weight_sync


@dataclass
class BatchTrace:
    """One step's batch: when it was sampled, trained and its update synced, and from which policy version."""

    index: int
    version: int = -1  # the engines' policy version when its sampling started
    gen_start: float = 0.0
    gen_end: float = 0.0
    train_start: float = 0.0
    train_end: float = 0.0
    sync_start: float = 0.0
    sync_end: float = 0.0

    @property
    def lag(self) -> int:
        """Updates the trainer had applied beyond the sampling policy when it trained on this batch."""
        return self.index - self.version


@dataclass
class Simulation:
    steps_per_s: float  # steady state: between the first and the last quarter of the steps
    trace: list[BatchTrace] = field(repr=False)


def simulate(rollout_s: float, update_s: float, sync_s: float, max_staleness: int, steps: int = 200) -> Simulation:
    """Run `steps` GRPO steps through the two resources (module docstring) and return the steady-state rate.

    >>> round(simulate(1.0, 1.0, 0.0, 0).steps_per_s, 6), round(simulate(1.0, 1.0, 0.0, 1).steps_per_s, 6)
    (0.5, 1.0)
    """
    if steps < 8 or max_staleness < 0:
        raise ValueError(f"need steps >= 8 and max_staleness >= 0, got {steps} and {max_staleness}")
    trace = [BatchTrace(k) for k in range(steps)]
    events: list[tuple[float, int, str, int]] = []  # (time, order, what ended, batch)
    order = 0
    engines_busy = trainer_busy = False
    version = next_gen = next_update = 0
    sampled: set[int] = set()  # batches sampled and not yet trained
    sync_due: int | None = None  # an update whose weights wait for the engines

    def finish(at: float, what: str, k: int) -> None:
        nonlocal order
        heapq.heappush(events, (at, order, what, k))
        order += 1

    def start_jobs(now: float) -> None:
        nonlocal engines_busy, trainer_busy, next_gen, next_update
        if sync_due is not None and not engines_busy:  # the sync goes first: fresher weights, the trainer waits
            engines_busy = True
            trace[sync_due].sync_start = now
            finish(now + sync_s, "sync", sync_due)
        if not trainer_busy and next_update in sampled:
            trainer_busy = True
            sampled.discard(next_update)
            trace[next_update].train_start = now
            finish(now + update_s, "update", next_update)
            next_update += 1
        if not engines_busy and next_gen < steps and version >= next_gen - max_staleness:
            engines_busy = True
            trace[next_gen].version, trace[next_gen].gen_start = version, now
            finish(now + rollout_s, "sample", next_gen)
            next_gen += 1

    start_jobs(0.0)
    while events:
        now = events[0][0]
        while events and events[0][0] <= now + 1e-12:  # every job ending now, before any starts
            _, _, what, k = heapq.heappop(events)
            if what == "sample":
                engines_busy, trace[k].gen_end = False, now
                sampled.add(k)
            elif what == "update":  # the trainer holds its weights until the engines have them
                trace[k].train_end, sync_due = now, k
            else:
                engines_busy = trainer_busy = False
                trace[k].sync_end, version, sync_due = now, k + 1, None
        start_jobs(now)
    # away from both ends: the pipeline filling up, and the last batches, whose syncs no longer wait for a next one
    first, last = steps // 4, steps - 1 - steps // 4
    rate = (last - first) / (trace[last].sync_end - trace[first].sync_end)
    return Simulation(rate, trace)


@dataclass(frozen=True)
class Projection:
    rollout_gpus: int
    trainer_gpus: int
    max_staleness: int
    steps_per_s: float
    speedup: float  # against max_staleness 0 on the same GPUs
    max_lag: int  # the largest lag any batch was trained at


def project(phases: PhaseTimes, gpus=GPUS, staleness=STALENESS, comm: float = COMM, steps: int = 200
            ) -> list[Projection]:
    """Steps/s of every (GPUs, N) pair, and its speed-up over N = 0 on the same GPUs.

    >>> [round(p.speedup, 3) for p in project(PhaseTimes(generate=3.0, train=1.0), [(1, 1)], (0, 1))]
    [1.0, 1.333]
    """
    out = []
    for r, t in gpus:
        base = simulate(*step_durations(phases, r, t, comm), 0, steps).steps_per_s
        for n in staleness:
            sim = simulate(*step_durations(phases, r, t, comm, n), n, steps)
            out.append(Projection(r, t, n, sim.steps_per_s, sim.steps_per_s / base, max(b.lag for b in sim.trace)))
    return out


def format_table(projections: list[Projection]) -> str:
    """A table: GPUs, N, steps/s, speed-up over N = 0 on the same GPUs and over 1+1 GPUs at N = 0."""
    ones = [p.steps_per_s for p in projections if (p.rollout_gpus, p.trainer_gpus, p.max_staleness) == (1, 1, 0)]
    lines = [f"{'rollout+trainer GPUs':>20s} {'N':>3s} {'steps/s':>9s} {'vs N=0':>7s} {'vs 1+1 N=0':>11s} "
             f"{'max lag':>8s}"]
    for p in projections:
        scale = f"{p.steps_per_s / ones[0]:10.2f}x" if ones else f"{'-':>11s}"
        lines.append(f"{f'{p.rollout_gpus}+{p.trainer_gpus}':>20s} {p.max_staleness:3d} {p.steps_per_s:9.3f} "
                     f"{p.speedup:6.2f}x {scale} {p.max_lag:8d}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in PhaseTimes.__dataclass_fields__:
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=0.0, help="seconds per step, 1+1 GPUs")
    parser.add_argument("--comm", type=float, default=COMM, help="gradient all-reduce / one-rank train time")
    args = parser.parse_args()
    phases = PhaseTimes(**{name: getattr(args, name) for name in PhaseTimes.__dataclass_fields__})
    print(format_table(project(phases, comm=args.comm)))


if __name__ == "__main__":
    main()
