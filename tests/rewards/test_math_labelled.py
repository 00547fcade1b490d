"""False positives and negatives of the math reward on real model replies with shipped labels.

data/smollm2_gsm8k_replies.jsonl: greedy replies of SmolLM2-135M-Instruct (converted by `python -m rlkit.models`)
to the first GSM8K test questions, each labelled by a second method (math-verify's own extraction from the
whole reply against the gold) and checked by hand (data/README.md). The README states the counts this computes.
"""

import json
from pathlib import Path

from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.math import MathReward

LABELS = Path(__file__).parents[2] / "data" / "smollm2_gsm8k_replies.jsonl"


def count_errors() -> tuple[int, int, int, int]:
    """(replies, labelled correct, false positives, false negatives)."""
    reward = MathReward()
    rows = [json.loads(line) for line in LABELS.read_text().splitlines()]
    fp = fn = right = 0
    for row in rows:
        judged = reward.score(Sample(row["question"], row["completion"], row["answer"])).verdict == Verdict.CORRECT
        right += row["label"] == "correct"
        fp += judged and row["label"] == "wrong"
        fn += not judged and row["label"] == "correct"
    return len(rows), right, fp, fn


def test_false_positives_and_negatives_match_the_readme():
    assert count_errors() == (32, 1, 0, 0)


if __name__ == "__main__":
    print("replies %d, labelled correct %d, false positives %d, false negatives %d" % count_errors())
