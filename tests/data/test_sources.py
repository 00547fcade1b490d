"""Reading data through `datasets` (rlkit.data.sources): TRL's formats detected from the columns, every file type,
and one clear line for a row of the wrong shape."""

import json
import subprocess
import sys

import pytest

from rlkit.recipe import DataConfig, RecipeError
from rlkit.data.tasks import Conversation, Preference, Problem, Stepwise
from rlkit.data.sources import detect_format, read_rows, to_record
from tests.e2e.test_quickstart import REPO

CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def records(path, data=DataConfig()):
    rows = read_rows(str(path), "", "train", "data.source")
    fmt = detect_format(list(rows[0]), data, "data.source")
    return fmt, [to_record(row, fmt, data, f"data.source: {path} row {i + 1}") for i, row in enumerate(rows)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, fmt, record", [
    ([{"prompt": "2+2?", "answer": 4}], "prompt_only", Problem("2+2?", "4", "4")),
    ([{"prompt": "2+2?", "completion": "4"}], "prompt_completion", Problem("2+2?", "", "4")),
    ([{"prompt": CHAT[:1], "completion": CHAT[1:]}], "prompt_completion", Conversation(tuple(CHAT), 1)),
    ([{"messages": CHAT}], "messages", Conversation(tuple(CHAT))),
    ([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}], "preference", Preference("2+2?", "4", "5")),
    ([{"chosen": CHAT, "rejected": CHAT[:1] + [{"role": "assistant", "content": "5"}]}], "preference",  # implicit
     Preference("2+2?", tuple(CHAT[1:]), ({"role": "assistant", "content": "5"},), messages=tuple(CHAT[:1]))),
    ([{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1}], "preference",
     Preference("2+2?", "4", "5", margin=1.0)),
    ([{"prompt": "2+3?", "completions": ["2+3=5", "So 5."], "labels": [True, False]}], "stepwise",
     Stepwise("2+3?", ("2+3=5", "So 5."), (True, False))),
], ids=["prompt-only", "prompt-completion", "conversational-prompt-completion", "messages", "preference",
        "implicit-prompt-preference", "preference-margin", "stepwise"])
def test_trl_formats_are_detected_from_the_columns(tmp_path, rows, fmt, record):
    assert records(write_jsonl(tmp_path / "d.jsonl", rows)) == (fmt, [record])


def test_every_file_type_loads_the_same_rows(tmp_path):
    import datasets

    rows = [{"question": f"{i}+1?", "answer": str(i + 1)} for i in range(5)]
    data = DataConfig(prompt_key="question")
    expected = records(write_jsonl(tmp_path / "d.jsonl", rows), data)
    (tmp_path / "array.json").write_text(json.dumps(rows))  # a JSON array, not JSON lines
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "folder").mkdir()
    ds.to_parquet(str(tmp_path / "folder" / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("array.json", "d.parquet", "d.csv", "folder", "saved"):
        assert records(tmp_path / name, data) == expected, name


@pytest.mark.parametrize("row, message", [
    ({"messages": "hi"}, "row 2: field 'messages' must be text or a non-empty list of {'role', 'content'} "
                         "messages, got str"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "row 2: field 'messages' message 0 must be {'role'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "row 2: field 'messages' has no assistant turn"),
], ids=["messages-as-text", "unknown-role", "no-assistant-turn"])
def test_a_message_field_of_the_wrong_shape_names_file_row_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, row])
    with pytest.raises(RecipeError) as err:
        records(path)
    assert f"data.source: {path} {message}" in str(err.value)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": {"text": "2+2?"}, "answer": "4"}], "row 1: field 'prompt' must be text or a non-empty list"),
    ([{"prompt": "2+2?", "answer": [4]}], "row 1: field 'answer' must be text or a number, got list"),
    ([{"prompt": "2+2?", "chosen": "4", "rejected": CHAT[1:]}], "row 1: 'prompt', 'chosen' and 'rejected' must all"),
    ([{"chosen": "4", "rejected": "5"}], "row 1: no 'prompt' field; text chosen/rejected need one"),
    ([{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": "big"}], "row 1: field 'margin' must be a number"),
    ([{"prompt": "q", "completions": ["a", "b"], "labels": [True]}], "row 1: 2 steps in 'completions' but 1 'labels'"),
    ([{"prompt": "q", "completions": ["a"], "labels": [1]}], "row 1: field 'labels' must be a list of true/false"),
], ids=["prompt-dict", "answer-list", "mixed-preference", "implicit-text-preference", "margin-text",
        "labels-short", "labels-int"])
def test_other_fields_of_the_wrong_shape(tmp_path, rows, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        records(write_jsonl(tmp_path / "d.jsonl", rows))


def test_format_can_be_forced_and_names_missing_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    with pytest.raises(RecipeError, match="format 'preference' needs the column.*chosen, rejected"):
        records(path, DataConfig(format="preference"))


def test_offline_hub_names_fail_in_one_line_and_leave_no_run_folder(tmp_path):
    """A hub dataset and a hub model while offline: one line each with the fix, exit 2, no run folder."""
    import os

    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    for override, expected in (("data.source=openai/gsm8k", "data.source: 'openai/gsm8k' is not a local file or "
                                "folder and the Hugging Face Hub could not be reached"),
                               ("model.path=Qwen/Qwen2.5-0.5B-Instruct", "model.path: 'Qwen/Qwen2.5-0.5B-Instruct' is "
                                "not a local folder and could not be fetched from the Hugging Face Hub")):
        out = tmp_path / "run"
        proc = subprocess.run([sys.executable, "-m", "rlkit.run", "recipes/quickstart.yaml", override,
                               f"logging.output_dir={out}"], cwd=REPO, capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and expected in error[0] and "HF_HUB_OFFLINE" in error[0], proc.stderr[-2000:]
        assert not out.exists()
