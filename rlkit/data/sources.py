"""Reading data: local files and folders and hub datasets through the `datasets` library, TRL's dataset formats
detected from the columns as TRL does, and each row checked and turned into a Problem, Conversation or Preference.

| format              | columns                                   | becomes                                   |
|---------------------|-------------------------------------------|-------------------------------------------|
| `prompt_only`       | prompt (+ answer, solution, task)         | Problem (prompt text or messages)         |
| `prompt_completion` | prompt, completion (+ answer)             | Problem (text) or Conversation (messages) |
| `messages`          | messages                                  | Conversation (every assistant turn)       |
| `preference`        | (prompt,) chosen, rejected (+ margin)     | Preference (text or messages)             |
| `stepwise`          | prompt, completions (steps), labels       | Stepwise (a process reward model's data)  |

`data.prompt_key`, `data.answer_key` and `data.solution_key` rename the prompt, answer and solution columns. A row
of the wrong shape fails with one line naming the source, the row (1-based) and the field; nothing is ever
turned into text with `str()` behind the user's back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rlkit.recipe import DataConfig, RecipeError, looks_local
from rlkit.data.tasks import Conversation, Preference, Problem, Stepwise

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
BUILDERS = {".jsonl": "json", ".json": "json", ".gz": "json", ".parquet": "parquet", ".csv": "csv"}


def read_rows(source: str, subset: str, split: str, where: str) -> list[dict[str, Any]]:
    """The rows of a local file or folder (a saved `datasets` folder, or data files), or of a hub dataset."""
    import datasets

    datasets.disable_progress_bars()
    try:
        path = Path(source).expanduser()
        if path.is_file():
            builder = BUILDERS.get(path.suffix)
            if builder is None:
                raise RecipeError(f"{where}: '{source}' is not a .jsonl, .json, .parquet or .csv file")
            if path.suffix in (".jsonl", ".json"):
                check_json_file(path, where)
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))  # written by Dataset.save_to_disk
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        elif path.is_dir() or not looks_local(source):
            ds = datasets.load_dataset(str(path) if path.is_dir() else source, subset or None, split=split)
        else:
            raise RecipeError(f"{where}: file '{source}' not found")
    except RecipeError:
        raise
    except (ConnectionError, OSError) as e:
        if looks_local(source):
            raise RecipeError(f"{where}: cannot read '{source}': {_first_line(e)}") from e
        raise RecipeError(
            f"{where}: '{source}' is not a local file or folder and the Hugging Face Hub could not be reached "
            f"({_first_line(e)}); give a local path, or load it once while online and set HF_HUB_OFFLINE=1") from e
    except Exception as e:  # datasets' own errors: a bad split name, a file pyarrow cannot parse, ...
        raise RecipeError(f"{where}: cannot read '{source}' (split '{split}'): {type(e).__name__}: "
                          f"{_first_line(e)}") from e
    rows = ds.to_list()
    if not rows:
        raise RecipeError(f"{where}: '{source}' holds no rows")
    return rows


def check_json_file(path: Path, where: str) -> None:
    """A JSON Lines file (or a JSON array) checked record by record, so a bad one is named by its line: `datasets`
    reports only the file, and turns an array of non-objects into a `text` column."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RecipeError(f"{where}: {path} line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                          "save the file as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{where}: {path} line {e.lineno} is not valid JSON ({e.msg})") from None
        lines = None
    else:
        records, lines = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RecipeError(f"{where}: {path} line {number} is not valid JSON ({e.msg})") from None
                lines.append(number)
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            at = f"line {lines[i]}" if lines else f"item {i + 1} of the array"
            raise RecipeError(f"{where}: {path} {at} is a JSON {type(record).__name__}, not an object; each record "
                              "must be an object such as {\"prompt\": ..., \"answer\": ...}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or repr(e)
    return text.splitlines()[0][:300]


def detect_format(columns: list[str], data: DataConfig, where: str) -> str:
    """TRL's rule: chosen and rejected make a preference dataset, messages a conversational one, a prompt with a
    completion a prompt-completion one, a prompt alone a prompt-only one. `data.format` overrides it."""
    cols = set(columns)
    needs = {"preference": {"chosen", "rejected"}, "stepwise": {data.prompt_key, "completions", "labels"},
             "messages": {"messages"}, "prompt_completion": {data.prompt_key, "completion"},
             "prompt_only": {data.prompt_key}}
    if data.format != "auto":
        missing = needs[data.format] - cols
        if missing:
            raise RecipeError(f"{where}: format '{data.format}' needs the column(s) {', '.join(sorted(missing))}; "
                              f"the data has {', '.join(columns)} (set {option(where, 'prompt_key')}, or rename "
                              "the columns)")
        return data.format
    for fmt in ("preference", "stepwise", "messages", "prompt_completion", "prompt_only"):
        if needs[fmt] <= cols:
            return fmt
    raise RecipeError(
        f"{where}: cannot tell the format from the columns {', '.join(columns)}; expected TRL's: '{data.prompt_key}' "
        f"(+ 'completion'), 'messages', or 'chosen'/'rejected'; set {option(where, 'prompt_key')} to the prompt's "
        "column")


def option(where: str, key: str) -> str:
    """How the user sets `key`: a recipe key beside `where` (data.prompt_key), or a command's flag (--prompt-key).

    >>> option("stages.0.data", "answer_key"), option("--input", "answer_key")
    ('stages.0.data.answer_key', '--answer-key')
    """
    return f"--{key.replace('_', '-')}" if where.startswith("--") else f"{where.split('.source')[0]}.{key}"


class RowError(RecipeError):
    pass


def parse_messages(value: Any, field: str, at: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(f"{at}: field '{field}' must be text or a non-empty list of {{'role', 'content'}} messages, "
                       f"got {type(value).__name__}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RowError(f"{at}: field '{field}' message {k} must be {{'role': one of {', '.join(ROLES)}, "
                           f"'content': text}}, got {str(m)[:120]}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _text_or_messages(value: Any, field: str, at: str) -> str | tuple[dict[str, str], ...]:
    if isinstance(value, str):
        return value
    if value is None:
        raise RowError(f"{at}: field '{field}' is missing")
    return parse_messages(value, field, at)


def _scalar(value: Any, field: str, at: str) -> str:
    """An answer or task: text, or a number written as text; never a list or a dict."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"{at}: field '{field}' must be text or a number, got {type(value).__name__}")
    return str(value)


def last_user_text(messages: tuple[dict[str, str], ...]) -> str:
    """The text a reward or a table shows for a conversational prompt: its last user turn."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


def to_record(row: dict[str, Any], fmt: str, data: DataConfig, at: str):
    """One row of a dataset of format `fmt` as a Problem, Conversation or Preference."""
    if fmt == "messages":
        messages = parse_messages(row.get("messages"), "messages", at)
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError(f"{at}: field 'messages' has no assistant turn to train on")
        return Conversation(messages)
    if fmt == "stepwise":
        return _stepwise(row, data, at)
    if fmt == "preference":
        chosen, rejected = (_text_or_messages(row.get(k), k, at) for k in ("chosen", "rejected"))
        prompt = row.get(data.prompt_key)
        if prompt is None:  # TRL's implicit prompt: the conversations' shared opening turns
            if isinstance(chosen, str) or isinstance(rejected, str):
                raise RowError(f"{at}: no '{data.prompt_key}' field; text chosen/rejected need one")
            shared = _shared_prefix(chosen, rejected)
            if not shared:
                raise RowError(f"{at}: no '{data.prompt_key}' field, and chosen and rejected share no opening turn")
            chosen, rejected, prompt = chosen[len(shared):], rejected[len(shared):], shared
        prompt = _text_or_messages(prompt, data.prompt_key, at)
        if isinstance(prompt, str) != isinstance(chosen, str) or isinstance(chosen, str) != isinstance(rejected, str):
            raise RowError(f"{at}: '{data.prompt_key}', 'chosen' and 'rejected' must all be text or all messages")
        margin = row.get("margin", 0.0)
        if margin is None:
            margin = 0.0
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise RowError(f"{at}: field 'margin' must be a number, got {type(margin).__name__}")
        if isinstance(prompt, str):
            return Preference(prompt, chosen, rejected, margin=float(margin))
        return Preference(last_user_text(prompt), chosen, rejected, messages=prompt, margin=float(margin))
    prompt = _text_or_messages(row.get(data.prompt_key), data.prompt_key, at)
    answer, task = _scalar(row.get(data.answer_key), data.answer_key, at), _scalar(row.get("task"), "task", at)
    if fmt == "prompt_completion":
        completion = _text_or_messages(row.get("completion"), "completion", at)
        if isinstance(prompt, str) != isinstance(completion, str):
            raise RowError(f"{at}: '{data.prompt_key}' and 'completion' must both be text or both messages")
        if not isinstance(prompt, str):
            return Conversation(prompt + completion, first_trained=len(prompt))
        return Problem(prompt, answer, completion, task)
    solution = _scalar(row.get(data.solution_key), data.solution_key, at) or answer
    if isinstance(prompt, str):
        return Problem(prompt, answer, solution, task)
    return Problem(last_user_text(prompt), answer, solution, task, messages=prompt)


def _stepwise(row: dict[str, Any], data: DataConfig, at: str) -> Stepwise:
    """A stepwise-supervision row: text steps (`completions`) with one bool label each."""
    prompt = _text_or_messages(row.get(data.prompt_key), data.prompt_key, at)
    steps, labels = row.get("completions"), row.get("labels")
    if not isinstance(steps, (list, tuple)) or not steps or not all(isinstance(s, str) for s in steps):
        raise RowError(f"{at}: field 'completions' must be a non-empty list of step texts")
    if not isinstance(labels, (list, tuple)) or not all(isinstance(v, bool) for v in labels):
        raise RowError(f"{at}: field 'labels' must be a list of true/false, one per step")
    if len(labels) != len(steps):
        raise RowError(f"{at}: {len(steps)} steps in 'completions' but {len(labels)} 'labels'; give one per step")
    if isinstance(prompt, str):
        return Stepwise(prompt, tuple(steps), tuple(labels))
    return Stepwise(last_user_text(prompt), tuple(steps), tuple(labels), messages=prompt)


def to_records(rows: list[dict[str, Any]], indices, data: DataConfig, where: str, source: str) -> tuple[str, list]:
    """(format, records) of the rows at `indices`, each error naming `where`, the source and the row (1-based)."""
    fmt = detect_format(list(rows[0]), data, where)
    return fmt, [to_record(rows[i], fmt, data, f"{where}: {source} row {i + 1}") for i in indices]


def _shared_prefix(a: tuple, b: tuple) -> tuple:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return a[:n]
