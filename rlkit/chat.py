"""Rendering: the one place text becomes token ids, for training, sampling, evaluation and rlkit.select.

With a chat template (`data.chat_template: auto` and a tokenizer that has one) a text prompt becomes a user turn
(`data.prompt_template` applied, `data.system_prompt` as a system turn before it) rendered by `transformers`'
`apply_chat_template` with the generation prompt; a reply is what the template renders for the assistant turn
after that prompt, up to and including its stop token (the template's end of turn, which the engine stops on).
Without one (the embedded default), a prompt is BOS + text and a reply is its text + EOS.

Multi-turn conversations are rendered turn by turn: each trained assistant turn is the difference between the
conversation rendered up to it with the generation prompt and rendered through it. That needs a template that
renders a conversation's start as a prefix of the whole; one that does not (e.g. it rewrites earlier turns)
fails with a clear error rather than training on tokens the model never sees at sampling time.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from rlkit.config import DataConfig, RecipeError
from rlkit.data import Conversation, Preference, Problem

Example = tuple[list[int], list[int]]  # (token ids, loss mask: 1 where the token is trained)
Pair = tuple[list[int], list[int], list[int]]  # (prompt ids, chosen reply ids, rejected reply ids)


class Renderer:
    """Token ids of prompts, replies, conversations and preference pairs for one data section."""

    def __init__(self, tokenizer, data: DataConfig, stop_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.chat = data.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        self.system_prompt, self.prompt_template = data.system_prompt, data.prompt_template
        self.stop_ids = {i for i in (*stop_ids, tokenizer.eos_token_id) if i is not None}
        if tokenizer.eos_token_id is None:
            raise RecipeError("model.path: the tokenizer has no eos_token; a reply could never end")

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    # -- prompts ---------------------------------------------------------------------------------------
    def conversation(self, item: Problem | Preference) -> list[dict[str, str]]:
        """The turns before the reply: the system prompt (unless the data has its own), then the prompt."""
        turns = list(item.messages) or [{"role": "user", "content": self.prompt_template.format(prompt=item.prompt)}]
        if self.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return turns

    def prompt_ids(self, item: Problem | Preference) -> list[int]:
        if self.chat:
            return self._render(self.conversation(item), generation_prompt=True)
        if item.messages:
            raise RecipeError("data.chat_template: conversational prompts need a chat template, and this one is "
                              "off ('none') or the tokenizer has none; use text prompts or a chat model's tokenizer")
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        system = self._encode(self.system_prompt + "\n") if self.system_prompt else []
        return bos + system + self._encode(self.prompt_template.format(prompt=item.prompt))

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # -- replies ---------------------------------------------------------------------------------------
    def reply_ids(self, item: Problem | Preference, reply: str | Sequence[dict]) -> list[int]:
        """The ids of `reply` (text, or assistant messages) after `item`'s prompt, ending with a stop token."""
        if not self.chat:
            if not isinstance(reply, str):
                raise RecipeError("data.chat_template: conversational replies need a chat template")
            return self._encode(reply) + [self.tokenizer.eos_token_id]
        context = self.conversation(item)
        turns = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else list(reply)
        ids, mask = self.conversation_example(Conversation(tuple(context + turns), first_trained=len(context)))
        start = mask.index(1)
        return ids[start:]

    def example(self, item: Problem | Conversation) -> Example:
        """An SFT example: a problem's prompt and solution, or a conversation's trained assistant turns."""
        if isinstance(item, Conversation):
            return self.conversation_example(item)
        prompt, reply = self.prompt_ids(item), self.reply_ids(item, item.solution)
        return prompt + reply, [0] * len(prompt) + [1] * len(reply)

    def pair(self, item: Preference) -> Pair:
        return self.prompt_ids(item), self.reply_ids(item, item.chosen), self.reply_ids(item, item.rejected)

    def conversation_example(self, item: Conversation) -> Example:
        """(ids, mask) of a whole conversation; the mask covers each trained assistant turn through its stop token
        and nothing else (not the template's text around it, not the other roles)."""
        if not self.chat:
            raise RecipeError("data.chat_template: conversational data needs a chat template, and this one is off "
                              "('none') or the tokenizer has none; use a chat model's tokenizer")
        turns = list(item.messages)
        offset = 0
        if self.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system_prompt})
            offset = 1
        ids: list[int] = []
        mask: list[int] = []
        for k, turn in enumerate(turns):
            if turn["role"] != "assistant" or k - offset < item.first_trained:
                continue
            context = self._render(turns[:k], generation_prompt=True)
            through = self._render(turns[: k + 1], generation_prompt=False)
            if context[: len(ids)] != ids or through[: len(context)] != context:
                raise RecipeError(
                    "data.chat_template: the tokenizer's chat template does not render the start of a conversation "
                    "as a prefix of the whole (it rewrites earlier turns), so assistant turns cannot be masked "
                    "exactly; train on prompt/completion data, or set data.chat_template=none")
            reply = self._through_stop(through[len(context):])
            mask += [0] * (len(context) - len(ids)) + [1] * len(reply)
            ids = context + reply
        if not any(mask):
            raise RecipeError("data: a conversation has no assistant turn to train on")
        return ids, mask

    def _through_stop(self, reply: list[int]) -> list[int]:
        """A rendered assistant turn up to and including its first stop token (the template's text after it,
        e.g. ChatML's newline, is the next turn's); a template without one gets EOS appended."""
        for i, token in enumerate(reply):
            if token in self.stop_ids:
                return reply[: i + 1]
        return reply + [self.tokenizer.eos_token_id]

    def _render(self, turns: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        # Text first, then ids, as TRL does: the same call on every transformers version, and the ids are exactly
        # what tokenizing the rendered text gives.
        text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(model_dir: str) -> list[int]:
    """The ids a model's generation config stops on (Llama 3 and Qwen list several), [] when it has none."""
    from pathlib import Path

    from transformers import GenerationConfig

    if not model_dir or not (Path(model_dir) / "generation_config.json").exists():
        return []
    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
