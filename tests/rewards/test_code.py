import gzip
import json
from pathlib import Path

import pytest

from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.code import CodeReward, assert_passes, decode, extract_code, normalise_output, prepare_tests
from rlkit.rewards.registry import RewardConfigError, RewardSpec
from rlkit.rewards.scorer import Scorer, ScorerConfig

HUMANEVAL = Path(__file__).parents[2] / "data" / "humaneval.jsonl.gz"
# straight-line asserts, float tolerances, a loop over random inputs with a helper, and one with `is True`
PROBLEMS = ["HumanEval/0", "HumanEval/2", "HumanEval/32", "HumanEval/38", "HumanEval/53"]


@pytest.fixture(scope="module")
def reward():
    return CodeReward()


@pytest.fixture(scope="module")
def humaneval():
    with gzip.open(HUMANEVAL, "rt") as f:
        rows = {row["task_id"]: row for row in map(json.loads, f)}
    return [rows[t] for t in PROBLEMS]


def gold_of(row):
    return {"test": row["test"], "entry_point": row["entry_point"], "prompt": row["prompt"]}


def test_canonical_solutions_pass_as_a_body_or_a_whole_function(reward, humaneval):
    for row in humaneval:
        body = reward.score(Sample(row["prompt"], row["canonical_solution"], gold_of(row)))
        assert body.verdict == Verdict.CORRECT, (row["task_id"], body.info)
        whole = f"Here it is:\n```python\n{row['prompt']}{row['canonical_solution']}```\nDone."
        assert reward.score(Sample(row["prompt"], whole, gold_of(row))).verdict == Verdict.CORRECT


def test_a_generator_in_an_assert_travels_as_its_items(reward):
    # all(... for ...) keeps `all` in the parent; the generator's items come back as a list, not an opaque generator
    gold = {"test": "def check(candidate):\n    xs = [1, 2]\n    assert all(candidate(x) == x * x for x in xs)",
            "entry_point": "f"}
    square, opaque = "def f(x):\n    return x * x", "class T:\n    pass\ndef f(x):\n    return T()"
    assert reward.score(Sample("", square, gold)).verdict == Verdict.CORRECT
    assert reward.score(Sample("", "def f(x):\n    return x", gold)).verdict == Verdict.WRONG
    gold["test"] = "def check(candidate):\n    assert all(candidate(x) for x in [1, 2])"
    assert reward.score(Sample("", opaque, gold)).verdict == Verdict.WRONG  # opaque values have no truth value


def test_broken_solutions_fail(reward, humaneval):
    for row in humaneval:
        for broken in ["    return None\n", "    raise NotImplementedError\n", "    return 1 +\n"]:
            result = reward.score(Sample(row["prompt"], broken, gold_of(row)))
            assert result.verdict == Verdict.WRONG and result.score == 0.0, (row["task_id"], broken)


def test_partial_credit_counts_the_asserts_that_held():
    gold = {"test": "def check(candidate):\n    assert candidate(1) == 1\n    assert candidate(2) == 4\n"
                    "    assert candidate(3) == 9\n    assert candidate(4) == 0", "entry_point": "f"}
    result = CodeReward(partial=True).score(Sample("", "def f(x):\n    return x * x", gold))
    assert result.verdict == Verdict.WRONG and result.score == pytest.approx(0.75)
    assert result.info == {"passed": 3, "total": 4, "reason": "assert 3 failed"}


def test_stdin_stdout_form(reward):
    gold = {"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7"]}
    assert reward.score(Sample("", "a, b = map(int, input().split())\nprint(a + b)  ", gold)).verdict == Verdict.CORRECT
    wrong = reward.score(Sample("", "a, b = map(int, input().split())\nprint(a - b)", gold))
    assert wrong.verdict == Verdict.WRONG and wrong.info["passed"] == 0
    crash = reward.score(Sample("", "print(3)\nraise SystemExit(1)", gold))
    assert crash.info["reason"] == "test 0 exited with 1"


def test_module_level_asserts_mbpp_style(reward):
    gold = {"test": "assert add(1, 2) == 3\nassert add(-1, 1) == 0", "entry_point": "add"}
    assert reward.score(Sample("", "def add(a, b):\n    return a + b", gold)).verdict == Verdict.CORRECT


def test_no_code_is_a_format_error_and_bad_gold_an_error(reward):
    assert reward.score(Sample("", "  ", {"test": "assert f()", "entry_point": "f"})).verdict == Verdict.FORMAT_ERROR
    with pytest.raises(ValueError, match="code gold needs"):
        reward.score(Sample("", "print(1)", "42"))


def test_asserts_are_split_so_literals_stay_outside():
    sent, skeletons = prepare_tests("def check(candidate):\n    assert abs(candidate(2.0) - 0.125) < 1e-6, 'msg'\n"
                                    "    assert candidate([1]) == [3, 4]\n    assert not candidate(0)")
    assert "0.125" not in sent and "[3, 4]" not in sent and "msg" not in sent
    assert "candidate(2.0)" in sent and "candidate([1])" in sent
    assert assert_passes(skeletons[0], [0.1250000001]) and not assert_passes(skeletons[0], [0.2])
    assert assert_passes(skeletons[1], [[3, 4]]) and not assert_passes(skeletons[1], [(3, 4)])
    assert assert_passes(skeletons[2], [0]) and not assert_passes(skeletons[2], [decode({"opaque": "Yes"})])


def test_decode_round_trips_plain_data_and_makes_the_rest_opaque():
    encoded = {"dict": [["a", {"tuple": [1, {"set": [2.5]}]}], [3, {"bytes": "6869"}]]}
    assert decode(encoded) == {"a": (1, {2.5}), 3: b"hi"}
    opaque = decode({"opaque": "Yes"})
    assert opaque != opaque and opaque != 0 and [opaque] != [0]
    assert decode({"set": [{"list": [1]}]}) != set()  # an unhashable item is malformed, not a crash


def test_extract_code():
    assert extract_code("<think>```python\nx = 1\n```</think>ok ```py\ny = 2\n```") == "y = 2\n"
    assert extract_code("def f(): pass") == "def f(): pass"
    assert normalise_output("1 \n2\n\n") == normalise_output("1\n2")


def test_the_scorer_runs_code_and_checks_the_deadline_leaves_room():
    spec = RewardSpec(name="code", kwargs={"wall_s": 2.0})
    gold = {"test": "def check(candidate):\n    assert candidate(3) == 6", "entry_point": "f"}
    with Scorer(ScorerConfig(rewards=[spec], timeout_s=5.0, num_workers=1)) as scorer:
        out = scorer.score([Sample("", "def f(x):\n    return 2 * x", gold), Sample("", "def f(x):\n    while 1: pass", gold)])
    assert [r.verdict for r in out.results] == [Verdict.CORRECT, Verdict.WRONG]  # a hang is wrong, not a fault
    Scorer(ScorerConfig(rewards=[RewardSpec(name="code")], num_workers=1)).close()  # the defaults fit together
    with pytest.raises(RewardConfigError, match=r"reward.rewards\[0\]: may take up to 11s .* reward.timeout_s is 5"):
        Scorer(ScorerConfig(rewards=[RewardSpec(name="code", kwargs={"wall_s": 10.0})], timeout_s=5.0))


def test_decoding_is_linear_even_for_hash_colliding_sets():
    # multiples of 2**61 - 1 all hash to 0: a set of 100,000 of them would take ~5e9 comparisons to build
    colliding = [k * (2**61 - 1) for k in range(100_000)]
    assert repr(decode({"set": colliding})) == "<opaque hash-colliding set>"
    assert repr(decode({"dict": [[k, 1] for k in colliding]})) == "<opaque hash-colliding dict>"
    assert decode({"set": [1, 2, -1, -2]}) == {1, 2, -1, -2}  # hash(-1) == hash(-2): a pair is fine
