import json
import random

import pytest

from rlkit.config import DataConfig, RecipeError
from rlkit.data import BatchSampler, load_splits, make_problem, read_jsonl


def test_synthetic_answers_are_right():
    rng = random.Random(0)
    for task in ("add", "mul"):
        for _ in range(200):
            p = make_problem(rng, task, 3)
            assert int(p.answer) == eval(p.prompt.rstrip("="))


def test_held_out_is_disjoint_and_reproducible():
    cfg = DataConfig(num_train=2000, num_eval=100, max_digits=2)
    train, held = load_splits(cfg)
    assert len(held) == 100 and len({p.prompt for p in held}) == 100
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert load_splits(cfg) == (train, held)


def test_held_out_larger_than_half_the_problem_space_is_refused():
    with pytest.raises(RecipeError, match="data.num_eval"):
        load_splits(DataConfig(num_train=10, num_eval=100, max_digits=1, tasks=["mul"]))


def test_jsonl_malformed_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{oops\n')
    with pytest.raises(RecipeError, match=r"d.jsonl:2 is not valid JSON"):
        read_jsonl(path, DataConfig())


def test_jsonl_missing_field_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(RecipeError, match="has no 'prompt' field.*question"):
        read_jsonl(path, DataConfig())


def test_gsm8k_loads_with_field_names(tmp_path):
    cfg = DataConfig(source="../shared/datasets/gsm8k_test.jsonl", prompt_key="question", num_eval=50, num_train=100)
    train, held = load_splits(cfg)
    assert len(held) == 50 and len(train) == 100
    assert "####" in held[0].answer


def test_sampler_resumes_from_position():
    items = list(range(10))
    a = BatchSampler(items, 4, seed=3)
    batches = [a.next() for _ in range(5)]
    b = BatchSampler(items, 4, seed=3)
    b.position = 3
    assert b.next() == batches[3]
    # every epoch is a permutation of the items
    assert sorted(sum(batches, [])[:10]) == items
