"""A practitioner's data made from the vendored GSM8K test file: chat-formatted SFT conversations, a preference file
and the prompts with answers themselves (TRL's formats), for the chat-model tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k_test.jsonl"
SYSTEM = "You are a careful math tutor."


def gsm8k_rows(start: int, stop: int) -> list[dict]:
    return [json.loads(line) for line in GSM8K.read_text().splitlines()[start:stop]]


def wrong(answer: str) -> str:
    """The worked solution with its final number changed: a plausible rejected answer."""
    head, _, final = answer.rpartition("####")
    value = re.sub(r"[^\d-]", "", final) or "0"
    return f"{head}#### {int(value) + 7}"


def write_files(folder: Path, sft_rows: int = 96, pairs: int = 48) -> dict[str, Path]:
    """messages.jsonl (one- and two-exchange conversations), preferences.jsonl (prompt/chosen/rejected text)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = gsm8k_rows(0, sft_rows + pairs)
    conversations = []
    for i, row in enumerate(rows[:sft_rows]):
        turns = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        if i % 3 == 0:  # some multi-turn conversations: every assistant turn is trained
            turns += [{"role": "user", "content": "And the final answer alone?"},
                      {"role": "assistant", "content": row["answer"].rpartition("####")[2].strip()}]
        conversations.append({"messages": turns})
    preferences = [{"prompt": r["question"], "chosen": r["answer"], "rejected": wrong(r["answer"])}
                   for r in rows[sft_rows:]]
    paths = {"messages": folder / "messages.jsonl", "preferences": folder / "preferences.jsonl"}
    for name, items in (("messages", conversations), ("preferences", preferences)):
        paths[name].write_text("".join(json.dumps(item) + "\n" for item in items))
    return paths
