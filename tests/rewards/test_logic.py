import time

import pytest

from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.logic import (CHECKERS, GENERATORS, LogicReward, check_countdown, check_knights, check_sudoku,
                           countdown_puzzle, knights_puzzle, sudoku_puzzle)
from rlkit.rewards.registry import RewardSpec
from rlkit.rewards.scorer import Scorer, ScorerConfig


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_generators_are_seeded_and_their_solutions_check(kind):
    for seed in range(20):
        puzzle = GENERATORS[kind](seed)
        assert puzzle == GENERATORS[kind](seed)  # same seed, same puzzle
        assert CHECKERS[kind](puzzle.gold, puzzle.solution) == (Verdict.CORRECT, "")
    assert len({GENERATORS[kind](seed).prompt for seed in range(20)}) > 10


KNIGHTS = {"kind": "knights", "names": ["Alice", "Bob"],
           # Alice: "Bob is a knave."  Bob: "Alice and I are the same kind."
           # Alice knight -> Bob knave -> Bob's claim (same kind) is false, as a knave's must be: fits.
           # Alice knave -> Bob knight -> Bob's claim must be true, but they differ: does not fit.
           "claims": [["is", 1, "knave"], ["same", 0, 1]]}


@pytest.mark.parametrize(
    "answer, verdict",
    [
        ("Alice: knight\nBob: knave", Verdict.CORRECT),
        ("**Alice** is a knight. **Bob** is a knave.", Verdict.CORRECT),
        ("Alice is a knave, Bob is a knight", Verdict.WRONG),
        ("Alice: knight\nBob: knight", Verdict.WRONG),
        ("Alice: knight", Verdict.WRONG),  # Bob left out
        ("Alice: knight\nBob is a knight or a knave", Verdict.WRONG),  # a hedge is no answer
        ("Alice: knave\nBob: knight\nOn second thought: Alice: knight, Bob: knave", Verdict.CORRECT),  # last wins
        ("They are all honest", Verdict.FORMAT_ERROR),
    ],
)
def test_knights_checker(answer, verdict):
    assert check_knights(KNIGHTS, answer)[0] == verdict


def test_knights_checker_uses_constraints_not_a_stored_answer():
    # "exactly one of us is a knight", said by both: either one alone fits... but the other's claim must be
    # false: Alice knight, Bob knave -> Bob's claim is true, contradiction. Both knaves: claim false, fits.
    gold = {"kind": "knights", "names": ["Alice", "Bob"], "claims": [["count", 1], ["count", 1]]}
    assert check_knights(gold, "Alice: knave\nBob: knave")[0] == Verdict.CORRECT
    assert check_knights(gold, "Alice: knight\nBob: knave")[0] == Verdict.WRONG


def test_knights_puzzles_have_one_solution():
    import itertools

    from rlkit.rewards.logic import _truth

    for seed in range(10):
        gold = knights_puzzle(seed, people=4).gold
        fits = [r for r in itertools.product([True, False], repeat=4)
                if all(_truth(c, r) == r[i] for i, c in enumerate(gold["claims"]))]
        assert len(fits) == 1


SUDOKU = {"kind": "sudoku", "size": 4, "givens": [1, 0, 0, 0,
                                                  0, 0, 1, 0,
                                                  0, 1, 0, 0,
                                                  0, 0, 0, 1]}


@pytest.mark.parametrize(
    "answer, verdict",
    [
        ("1 2 3 4\n3 4 1 2\n2 1 4 3\n4 3 2 1", Verdict.CORRECT),
        ("Row 1: 1 2 3 4\nRow 2: 3 4 1 2\nRow 3: 2 1 4 3\nRow 4: 4 3 2 1", Verdict.CORRECT),
        ("1234341221434321", Verdict.CORRECT),
        ("1 2 4 3\n3 4 1 2\n2 1 3 4\n4 3 2 1", Verdict.CORRECT),  # another valid completion: constraints, not a key
        ("1 1 3 4\n3 4 1 2\n2 1 4 3\n4 3 2 1", Verdict.WRONG),  # a repeated digit
        ("2 1 3 4\n3 4 2 1\n1 2 4 3\n4 3 1 2", Verdict.WRONG),  # a valid grid, but a given (1 at the corner) changed
        ("1 2 3 4\n3 4 1 2", Verdict.FORMAT_ERROR),
    ],
)
def test_sudoku_checker(answer, verdict):
    assert check_sudoku(SUDOKU, answer)[0] == verdict


def test_a_latin_square_is_not_a_sudoku():
    empty = {"kind": "sudoku", "size": 4, "givens": [0] * 16}
    assert check_sudoku(empty, "1 2 3 4\n2 3 4 1\n3 4 1 2\n4 1 2 3") == (Verdict.WRONG, "box 1 does not hold 1-4 once each")


def test_sudoku_9x9_has_a_unique_solution_and_checks():
    from rlkit.rewards.logic import _solve

    puzzle = sudoku_puzzle(seed=3, size=9)
    assert sum(v == 0 for v in puzzle.gold["givens"]) >= 40
    assert len(_solve(list(puzzle.gold["givens"]), 9, 2)) == 1
    assert check_sudoku(puzzle.gold, puzzle.solution)[0] == Verdict.CORRECT


COUNTDOWN = {"kind": "countdown", "numbers": [2, 3, 7, 25], "target": 44}


@pytest.mark.parametrize(
    "answer, verdict",
    [
        ("25 + 7 * 3 - 2", Verdict.CORRECT),
        ("(25 + 7*3) - 2 = 44", Verdict.CORRECT),
        ("$25 + 7 \u00d7 3 - 2$", Verdict.CORRECT),
        ("25 + 7 * 3 + 2", Verdict.WRONG),  # 48
        ("25 + 25 - 3 - 3", Verdict.WRONG),  # 44, but not the given numbers
        ("44", Verdict.FORMAT_ERROR),  # no arithmetic: just the target
        ("__import__('os').system('true') + 1", Verdict.WRONG),  # only numbers and + - * / are evaluated
        ("25 / (3 - 3) + 2 * 7", Verdict.WRONG),
        ("(" * 300 + "1" + ")" * 300 + "+1", Verdict.FORMAT_ERROR),
    ],
)
def test_countdown_checker(answer, verdict):
    assert check_countdown(COUNTDOWN, answer)[0] == verdict


def test_logic_reward_reads_the_answer_block_and_rejects_huge_answers():
    puzzle = countdown_puzzle(seed=5)
    reward = LogicReward()
    good = reward.score(Sample(puzzle.prompt, f"<think>try things 1 2 3</think><answer>{puzzle.solution}</answer>", puzzle.gold))
    assert good.verdict == Verdict.CORRECT and good.score == 1.0
    assert reward.score(Sample(puzzle.prompt, "<answer>" + "1+" * 500_000 + "1</answer>", puzzle.gold)).verdict == Verdict.FORMAT_ERROR
    with pytest.raises(ValueError, match="logic gold needs 'kind'"):
        reward.score(Sample("q", "1", {"kind": "chess"}))


def test_logic_and_format_through_the_scorer():
    puzzles = [knights_puzzle(1), sudoku_puzzle(2), countdown_puzzle(3)]
    samples = [Sample(p.prompt, f"<think>solve</think><answer>{p.solution}</answer>", p.gold) for p in puzzles]
    samples.append(Sample(puzzles[0].prompt, puzzles[1].solution, puzzles[0].gold))  # no tags, and nonsense
    cfg = ScorerConfig(rewards=[RewardSpec(name="logic"), RewardSpec(name="format", weight=0.1)], num_workers=1)
    with Scorer(cfg) as scorer:
        start = time.perf_counter()
        out = scorer.score(samples)
        assert time.perf_counter() - start < 2
    assert out.scores == pytest.approx([1.1, 1.1, 1.1, 0.0])
    assert [r.verdict for r in out.results] == [Verdict.CORRECT] * 3 + [Verdict.FORMAT_ERROR]
