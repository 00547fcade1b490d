import json
import random
from pathlib import Path

import pytest

from rlkit.recipe import DataConfig, RecipeError
from rlkit.data.tasks import BatchSampler, make_problem, synthetic_splits
from rlkit.data.prepare import _Rows, recipe_splits


def load_splits(cfg: DataConfig):
    """(training records, held-out problems) of a recipe's data section."""
    return recipe_splits(cfg, _Rows())[1:3]


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
    with pytest.raises(RecipeError, match=r"data.source: .*d.jsonl line 2 is not valid JSON"):
        load_splits(DataConfig(source=str(path), num_eval=1))


def test_missing_prompt_column_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": "2"}) + "\n" for i in range(3)))
    with pytest.raises(RecipeError, match="columns question, answer.*set data.prompt_key"):
        load_splits(DataConfig(source=str(path), num_eval=1))


def test_gsm8k_loads_with_field_names(tmp_path):
    gsm8k = Path(__file__).parents[2] / "data" / "gsm8k_test.jsonl"
    cfg = DataConfig(source=str(gsm8k), prompt_key="question", num_eval=50, num_train=100)
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


def test_abstain_rate_replaces_only_training_targets():
    base = DataConfig(num_train=2000, num_eval=100, max_digits=2, tasks=["mul", "mul_hard"])
    train, held = synthetic_splits(base)
    honest_train, honest_held = synthetic_splits(DataConfig(**{**base.__dict__, "abstain_rate": 0.1}))
    assert [p.prompt for p in honest_train] == [p.prompt for p in train] and honest_held == held
    abstained = [p for p in honest_train if p.solution == "I don't know"]
    assert 0.07 < len(abstained) / len(train) < 0.13
    assert all(p.answer == str(eval(p.prompt.rstrip("="))) for p in abstained)  # the gold answer stays


def test_mul_hard_has_two_two_digit_operands():
    rng = random.Random(0)
    for _ in range(100):
        a, b = make_problem(rng, "mul_hard", 2).prompt.rstrip("=").split("*")
        assert len(a) == 2 and len(b) == 2


def test_eval_source_replaces_the_held_out_split(tmp_path):
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(50)))
    train, held = load_splits(DataConfig(num_train=300, num_eval=20, max_digits=2, eval_source=str(path)))
    assert [p.prompt for p in held] == [f"{i}+1=" for i in range(20)] and len(train) == 300


def test_select_names_its_own_flags_for_a_bad_input_file(tmp_path, capsys):
    from rlkit.select import main

    bad = tmp_path / "sft.jsonl"
    bad.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    assert main(["--model", str(tmp_path), "--input", str(bad), "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--input:" in err and "columns question, answer" in err and "set --prompt-key" in err
    assert main(["--model", str(tmp_path), "--input", str(tmp_path / "nope.jsonl"), "--output", "x"]) == 2
    assert "--input: file" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()


def test_tool_traces_call_the_calculator_on_training_problems_only():
    from rlkit.envs.tools import parse_tool_calls
    from rlkit.data.tasks import tool_trace

    train, held = synthetic_splits(DataConfig(tasks=["mul_hard"], max_digits=2, num_train=50, num_eval=20,
                                              tool_traces=True))
    assert all(p.trace for p in train) and not any(p.trace for p in held)
    for p in train:
        call, response, answer = p.trace
        [parsed] = parse_tool_calls(call["content"])
        assert parsed.arguments == {"expression": p.prompt[:-1]}  # "37*58=" -> "37*58"
        assert (response["role"], response["content"], answer["content"]) == ("tool", p.answer, p.answer)
    assert tool_trace(make_problem(random.Random(0), "add", 2))[1]["content"].isdigit()
