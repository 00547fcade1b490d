import time

import pytest

from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.registry import RewardConfigError, RewardSpec
from rlkit.rewards.scorer import RewardError, Scorer, ScorerConfig

FLAKY = RewardSpec(import_path="tests.rewards.helpers:Flaky")


def samples(*completions, gold="4"):
    return [Sample("2+2=", c, gold) for c in completions]


def test_weighted_rewards_with_a_user_class():
    cfg = ScorerConfig(rewards=[RewardSpec(name="math"),
                                RewardSpec(import_path="tests.rewards.helpers:LengthReward", weight=0.5, kwargs={"limit": 1})],
                       num_workers=2)
    with Scorer(cfg) as scorer:
        out = scorer.score(samples("4", "44", "4 "))
    # "4": math 1 + 0.5 * length 1; "44": 0 + 0; "4 ": math 1 + 0.5 * 0
    assert out.scores == [1.5, 0.0, 1.0]
    assert out.results[0].components == {"math": 1.0, "LengthReward": 1.0}
    assert out.results[1].verdict == Verdict.WRONG  # the first reward's verdict
    assert out.stats["math/mean"] == pytest.approx(2 / 3) and out.stats["verdict/correct"] == 2


def test_a_registered_name_reaches_the_workers(monkeypatch):
    from rlkit.rewards import registry

    monkeypatch.setattr(registry, "_BUILTINS", dict(registry._BUILTINS))  # undone after the test
    registry.register_reward("brevity", "tests.rewards.helpers:LengthReward")
    with Scorer(ScorerConfig(rewards=[RewardSpec(name="brevity", kwargs={"limit": 2})], num_workers=1)) as scorer:
        out = scorer.score(samples("4", "444"))
    assert out.scores == [1.0, 0.0] and out.results[0].components == {"brevity": 1.0}


@pytest.mark.parametrize(
    "spec, message",
    [
        (RewardSpec(name="mth"), "reward.rewards[0].name: unknown reward 'mth'. Did you mean 'math'?"),
        (RewardSpec(import_path="no.such.module:X"), "reward.rewards[0].import_path: cannot import module 'no.such.module'"),
        (RewardSpec(import_path="tests.rewards.helpers:Missing"), "has no attribute 'Missing'"),
        (RewardSpec(import_path="tests.rewards.helpers"), "not of the form 'pkg.module:Class'"),
        (RewardSpec(import_path="tests.rewards.helpers:NotAReward"), "has no score(sample) method"),
        (RewardSpec(import_path="tests.rewards.helpers:LengthReward", kwargs={"nope": 1}), "bad kwargs for LengthReward"),
    ],
)
def test_bad_reward_specs_fail_at_construction(spec, message):
    with pytest.raises(RewardConfigError) as err:
        Scorer(ScorerConfig(rewards=[spec]))
    assert message in str(err.value)


def test_errors_and_timeouts_are_reported_not_zeroed():
    cfg = ScorerConfig(rewards=[FLAKY], timeout_s=1.0, on_error="exclude", num_workers=2)
    with Scorer(cfg) as scorer:
        start = time.perf_counter()
        out = scorer.score(samples("ok", "boom", "hang", "exit", "ok again"))
        elapsed = time.perf_counter() - start
        assert elapsed < 8  # the hung sample is killed at its deadline
        verdicts = [r.verdict for r in out.results]
        assert verdicts == [Verdict.CORRECT, Verdict.ERROR, Verdict.TIMEOUT, Verdict.ERROR, Verdict.CORRECT]
        # the hang is the model's fault: a wrong answer (Flaky has no `wrong`: 0.0) kept in the loss
        assert out.valid == [True, False, True, False, True] and out.scores[2] == 0.0
        assert "ValueError: boom" in out.results[1].info["Flaky"]["error"]
        assert out.stats["errors"] == 2 and out.stats["timeouts"] == 1 and out.stats["excluded"] == 2
        # the replaced workers keep serving
        assert scorer.score(samples("fine")).scores == [1.0]


def test_a_hang_inside_a_large_batch_times_out_only_that_sample():
    # 40 samples go out in chunks; the hang is found by its own deadline, the rest of its chunk is rerun
    batch = ["ok"] * 40
    batch[17] = "hang"
    batch[31] = "exit"
    with Scorer(ScorerConfig(rewards=[FLAKY], timeout_s=1.0, on_error="exclude", num_workers=2)) as scorer:
        start = time.perf_counter()
        out = scorer.score(samples(*batch))
        assert time.perf_counter() - start < 10
    verdicts = [r.verdict for r in out.results]
    assert verdicts[17] == Verdict.TIMEOUT and verdicts[31] == Verdict.ERROR
    assert verdicts.count(Verdict.CORRECT) == 38
    # the error does not drag the component mean to 0; the timeout is a wrong answer (0.0) and counts: 38 / 39
    assert out.stats["Flaky/mean"] == pytest.approx(38 / 39)
    assert out.stats["score/mean"] == pytest.approx(38 / 39) and out.stats["excluded"] == 1


def test_a_worker_that_died_while_idle_is_replaced():
    with Scorer(ScorerConfig(rewards=[FLAKY], num_workers=1)) as scorer:
        scorer._pool._workers[0].process.kill()
        scorer._pool._workers[0].process.join()
        assert scorer.score(samples("ok", "ok")).scores == [1.0, 1.0]


def test_sys_exit_and_unpicklable_info_are_handled_in_the_worker():
    with Scorer(ScorerConfig(rewards=[FLAKY], on_error="exclude", num_workers=1)) as scorer:
        out = scorer.score(samples("sysexit", "lambda", "ok"))
    assert out.results[0].verdict == Verdict.ERROR and "SystemExit: 3" in out.results[0].info["Flaky"]["error"]
    assert out.results[1].verdict == Verdict.CORRECT and "lambda" in out.results[1].info["Flaky"]["fn"]
    assert out.valid == [False, True, True]


def test_on_error_score_uses_the_configured_value():
    cfg = ScorerConfig(rewards=[FLAKY], on_error="score", error_score=-1.0, num_workers=1)
    with Scorer(cfg) as scorer:
        out = scorer.score(samples("boom", "ok"))
    assert out.scores == [-1.0, 1.0] and out.valid == [True, True]


def test_on_error_fail_names_the_reward_and_sample():
    with Scorer(ScorerConfig(rewards=[FLAKY], on_error="fail", num_workers=1)) as scorer:
        with pytest.raises(RewardError, match="reward 'Flaky' gave error on sample 1"):
            scorer.score(samples("ok", "boom"))


def test_on_error_fail_stops_on_errors_not_on_a_models_timeout():
    cfg = ScorerConfig(rewards=[RewardSpec(import_path="tests.rewards.helpers:FlakyWithWrong")], timeout_s=1.0,
                       on_error="fail", num_workers=1)
    with Scorer(cfg) as scorer:
        out = scorer.score(samples("ok", "hang"))
        assert [r.verdict for r in out.results] == [Verdict.CORRECT, Verdict.TIMEOUT]
        assert out.scores == [1.0, -2.0] and out.valid == [True, True]  # the reward's own `wrong` value
        assert out.stats["timeouts"] == 1 and out.stats["errors"] == 0
        with pytest.raises(RewardError, match="gave error on sample 0"):
            scorer.score(samples("boom"))


def test_gold_rewards_are_scored_beside_the_trained_ones_and_never_in_the_score():
    # trained: LengthReward (limit 1); gold: math (weight 2) and Flaky. "4": length 1, gold 2 * 1 + 1 = 3;
    # "44": length 0, gold 0 + 1 = 1 (math's verdict: wrong); "boom": length 0, Flaky raises: a gold ERROR that
    # leaves the trained sample alone (valid, score 0) and the gold statistics
    cfg = ScorerConfig(rewards=[RewardSpec(import_path="tests.rewards.helpers:LengthReward", kwargs={"limit": 1})],
                       gold=[RewardSpec(name="math", weight=2.0), FLAKY], on_error="exclude", num_workers=1)
    with Scorer(cfg) as scorer:
        out = scorer.score(samples("4", "44", "boom"))
        assert out.scores == [1.0, 0.0, 0.0] and out.valid == [True, True, True]
        assert out.proxy == out.scores  # LengthReward has no raw component: the proxy is its score
        assert out.results[0].components == {"LengthReward": 1.0}  # gold is not a component of the score
        assert out.gold_scores[:2] == [3.0, 1.0] and out.gold_valid == [True, True, False]
        assert [r.verdict for r in out.gold_results] == [Verdict.CORRECT, Verdict.WRONG, Verdict.ERROR]
        assert out.stats["gold/errors"] == 1 and out.stats["gold/math/mean"] == pytest.approx(1 / 3)
        assert out.stats["errors"] == 0 and "verdict/error" not in out.stats
        assert scorer.labels == ["LengthReward"] and scorer.gold_labels == ["math", "Flaky"]
    with pytest.raises(RewardConfigError, match=r"reward.gold\[0\].name: unknown reward 'mth'"):
        Scorer(ScorerConfig(gold=[RewardSpec(name="mth")]))


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{" + "2^{" * 50 + "2" + "}" * 50 + "}",  # a power tower
        "\\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}",  # deep nesting
        "\\boxed{" + "x+" * 300_000 + "1}",  # a megabyte-sized expression
    ],
    ids=["power-tower", "deep-nesting", "megabyte"],
)
def test_pathological_latex_ends_quickly(completion):
    with Scorer(ScorerConfig(timeout_s=2.0, on_error="exclude", num_workers=1)) as scorer:
        start = time.perf_counter()
        out = scorer.score([Sample("q", completion, "4")])
        assert time.perf_counter() - start < 10
    assert out.results[0].verdict in (Verdict.WRONG, Verdict.TIMEOUT, Verdict.FORMAT_ERROR)


def test_a_training_batch_is_scored_fast():
    # the trainer's hot path: ~128 short samples per step, one message per chunk rather than per sample
    batch = [Sample("q", f"so the answer is \\boxed{{{i % 7}}}", str(i % 5)) for i in range(128)]
    with Scorer(ScorerConfig(num_workers=2)) as scorer:
        scorer.score(batch[:4])
        start = time.perf_counter()
        out = scorer.score(batch)
        assert time.perf_counter() - start < 2.0
    assert len(out.scores) == 128 and out.stats["errors"] == 0
