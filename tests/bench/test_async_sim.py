"""bench/async_sim.py: steady-state periods worked out by hand, the staleness bound and the sync stall on the trace."""

import itertools

import pytest

from bench.async_sim import PhaseTimes, format_table, project, simulate, step_durations


def period(rollout_s, update_s, sync_s, n):
    return 1.0 / simulate(rollout_s, update_s, sync_s, n).steps_per_s


def test_equal_generate_and_train_overlap_fully():
    # N=0: generate 1 s, then train 1 s, serial -> 2 s a step. N=1: batch t+1 is sampled while t trains -> 1 s
    assert period(1.0, 1.0, 0.0, 0) == pytest.approx(2.0)
    assert period(1.0, 1.0, 0.0, 1) == pytest.approx(1.0)


def test_generation_bound_pipeline_runs_at_the_generation_period():
    # generate 3 s, train 1 s: N=0 takes 3 + 1 = 4 s; N=1 hides the update behind sampling -> 3 s (4/3 = 1.33x)
    assert period(3.0, 1.0, 0.0, 0) == pytest.approx(4.0)
    assert period(3.0, 1.0, 0.0, 1) == pytest.approx(3.0)
    assert period(3.0, 1.0, 0.0, 2) == pytest.approx(3.0)  # more staleness cannot beat the engines' own period
    (base, one) = project(PhaseTimes(generate=3.0, train=1.0), [(1, 1)], (0, 1))
    assert (base.speedup, one.speedup) == (1.0, pytest.approx(4 / 3))


def test_training_bound_pipeline_runs_at_the_update_period():
    # generate 1 s, train 3 s: N=1 -> 3 s a step (the engines idle 2 s of every 3 at the staleness bound)
    assert period(1.0, 3.0, 0.0, 0) == pytest.approx(4.0)
    assert period(1.0, 3.0, 0.0, 1) == pytest.approx(3.0)


def test_weight_sync_stalls_the_engines():
    # generate 1, train 1, sync 0.5: the sync holds trainer and engines, so N=1 gives max(1, 1) + 0.5 = 1.5 s
    # and N=0 gives 1 + 1 + 0.5 = 2.5 s
    assert period(1.0, 1.0, 0.5, 0) == pytest.approx(2.5)
    assert period(1.0, 1.0, 0.5, 1) == pytest.approx(1.5)
    trace = simulate(1.0, 1.0, 0.5, 1, steps=40).trace
    syncs = [(b.sync_start, b.sync_end) for b in trace]
    for b, (s0, s1) in itertools.product(trace, syncs):  # no engine batch runs during any sync
        assert b.gen_end <= s0 + 1e-9 or b.gen_start >= s1 - 1e-9


def test_zero_staleness_is_strict_alternation():
    trace = simulate(0.7, 0.4, 0.1, 0, steps=20).trace
    assert all(b.lag == 0 for b in trace)
    for b, nxt in zip(trace, trace[1:]):
        assert b.train_start == pytest.approx(b.gen_end)  # the trainer takes the batch as soon as it is sampled
        assert b.sync_start == pytest.approx(b.train_end)
        assert nxt.gen_start == pytest.approx(b.sync_end)  # the next batch waits for these weights


@pytest.mark.parametrize("n", [0, 1, 2, 3])
@pytest.mark.parametrize("rollout_s,update_s,sync_s", [(1.0, 3.0, 0.0), (3.0, 1.0, 0.2), (0.3, 0.7, 0.05),
                                                       (1.0, 1.0, 0.0), (0.1, 2.0, 1.0)])
def test_no_batch_is_trained_more_than_n_versions_after_it_was_sampled(n, rollout_s, update_s, sync_s):
    trace = simulate(rollout_s, update_s, sync_s, n, steps=60).trace
    for b in trace:
        assert 0 <= b.lag <= n
        # the version a batch records is what the engines held: the sync that made it ended before sampling began
        if b.version:
            assert trace[b.version - 1].sync_end <= b.gen_start + 1e-9
        assert b.gen_start <= b.gen_end <= b.train_start <= b.train_end <= b.sync_start <= b.sync_end
    # each resource runs one job at a time, in step order
    for b, nxt in zip(trace, trace[1:]):
        assert nxt.gen_start >= b.gen_end - 1e-9 and nxt.train_start >= b.sync_end - 1e-9


def test_a_slow_trainer_uses_the_whole_staleness_budget():
    # the engines run ahead until the bound stops them: with training 4x slower than sampling, lag reaches N
    assert max(b.lag for b in simulate(1.0, 4.0, 0.0, 2).trace) == 2


def test_scaling_splits_generation_and_training_and_charges_the_all_reduce():
    phases = PhaseTimes(generate=8.0, score=0.4, reference=1.0, train=3.0, weight_sync=0.5)
    # one GPU each: the measured phases, no all-reduce
    assert step_durations(phases, 1, 1) == pytest.approx((8.4, 4.0, 0.5))
    # 4 engines: 8.4 / 4; 2 ranks: 4 / 2 + 0.1 * 3 * 2 * (1/2) all-reduce = 2.3; the sync stays 0.5
    assert step_durations(phases, 4, 2, comm=0.1) == pytest.approx((2.1, 2.3, 0.5))
    # 16 ranks, comm 0: a perfect split
    assert step_durations(phases, 16, 16, comm=0.0) == pytest.approx((8.4 / 16, 4.0 / 16, 0.5))


def test_projection_table_has_every_config():
    rows = project(PhaseTimes(generate=2.0, score=0.1, reference=0.2, train=1.0, weight_sync=0.1))
    assert [(p.rollout_gpus, p.max_staleness) for p in rows] == [(g, n) for g in (1, 4, 16) for n in (0, 1, 2)]
    assert all(p.speedup == 1.0 for p in rows if p.max_staleness == 0)
    assert all(p.speedup >= 1.0 and p.max_lag <= p.max_staleness for p in rows)
    assert len(format_table(rows).splitlines()) == 1 + len(rows)


def test_phase_times_from_logged_metrics():
    means = {"grpo/time/generate": 0.5, "grpo/time/weight_sync": 0.1, "grpo/async/staleness": 1.0}
    assert PhaseTimes.from_metrics(means) == PhaseTimes(generate=0.5, weight_sync=0.1)


def test_docstring_examples():
    import doctest

    import bench.async_sim

    assert doctest.testmod(bench.async_sim).failed == 0  # pytest's --doctest-modules skips bench/


def test_off_policy_steps_pay_the_proximal_forward():
    # generate 1, train 1, proximal forward 0.5: N=0 needs none -> 2 s; N=1 updates in 1.5 s, which the 1 s of
    # sampling hides under -> 1.5 s a step, 2/1.5 = 1.33x (not the 2x of a free proximal forward)
    phases = PhaseTimes(generate=1.0, train=1.0, proximal=0.5)
    assert step_durations(phases, 1, 1, max_staleness=0) == pytest.approx((1.0, 1.0, 0.0))
    assert step_durations(phases, 1, 1, max_staleness=1) == pytest.approx((1.0, 1.5, 0.0))
    # 2 ranks split it like the rest of the update: (1 + 0.5) / 2 + 0.1 * 1 * 2 * (1/2) = 0.85
    assert step_durations(phases, 1, 2, comm=0.1, max_staleness=2) == pytest.approx((1.0, 0.85, 0.0))
    (base, one) = project(phases, [(1, 1)], (0, 1))
    assert base.steps_per_s == pytest.approx(0.5) and one.speedup == pytest.approx(4 / 3)
