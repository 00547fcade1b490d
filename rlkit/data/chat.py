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

from rlkit.recipe import DataConfig, RecipeError
from rlkit.data.tasks import Conversation, Preference, Problem, Stepwise
from rlkit.rewards.model import step_ids

Example = tuple[list[int], list[int]]  # (token ids, loss mask: 1 where the token is trained)
Pair = tuple[list[int], list[int], list[int]]  # (prompt ids, chosen reply ids, rejected reply ids)
StepExample = tuple[list[int], list[int], list[bool]]  # (token ids, each step's scored position, its label)


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
    def conversation(self, item: Problem | Preference | Stepwise) -> list[dict[str, str]]:
        """The turns before the reply: the system prompt (unless the data has its own), then the prompt."""
        turns = list(item.messages) or [{"role": "user", "content": self.prompt_template.format(prompt=item.prompt)}]
        if self.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return turns

    def prompt_ids(self, item: Problem | Preference | Stepwise) -> list[int]:
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
        """An SFT example: a problem's prompt and solution (or its tool-use trace), or a conversation's trained
        assistant turns."""
        if isinstance(item, Conversation):
            return self.conversation_example(item)
        if item.trace:
            return self.episode_example(item, item.trace)
        prompt, reply = self.prompt_ids(item), self.reply_ids(item, item.solution)
        return prompt + reply, [0] * len(prompt) + [1] * len(reply)

    def pair(self, item: Preference) -> Pair:
        return self.prompt_ids(item), self.reply_ids(item, item.chosen), self.reply_ids(item, item.rejected)

    def stepwise(self, item: Stepwise, separator: str) -> StepExample:
        """A process reward model's example: the prompt, then each step and `separator` tokenized step by step
        (rlkit.rewards.model.step_ids, which the `model` reward scores with), each scored at its separator's end."""
        prompt = self.prompt_ids(item)
        ids, ends = step_ids(self._encode, item.steps, separator)
        return prompt + ids, [len(prompt) + e for e in ends], list(item.labels)

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

    # -- episodes (rlkit.algorithms.episodes): one turn at a time, the ids before it never re-tokenized ------------------
    def history(self, item: Problem, opening: Sequence[dict] = ()) -> list[dict[str, str]]:
        """The turns an episode starts from: the environment's opening turns, else the problem's prompt turns."""
        return list(opening) or (self.conversation(item) if self.chat else [])

    def opening_ids(self, opening: Sequence[dict]) -> list[int]:
        """The prompt of an episode the environment opens itself (Environment.reset): its turns with the generation
        prompt; without a chat template BOS and the turns' texts, one a line."""
        if self.chat:
            return self._render(list(opening), generation_prompt=True)
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self._encode("\n".join(m["content"] for m in opening))

    def assistant_ids(self, history: Sequence[dict], content: str) -> list[int]:
        """An assistant turn after `history` (ending with the generation prompt), through its stop token: what the
        policy samples there. Without a chat template its text and EOS."""
        if not self.chat:
            return self._encode(content) + [self.tokenizer.eos_token_id]
        context = self._render_text(list(history), generation_prompt=True)
        through = self._render_text([*history, {"role": "assistant", "content": content}], generation_prompt=False)
        self._check_prefix(context, through)
        return self._through_stop(self._encode(through[len(context):]))

    def env_ids(self, history: Sequence[dict], messages: Sequence[dict]) -> list[int]:
        """The environment's turns after an assistant turn (`history` ends with it, sampled through its stop token),
        up to the next generation prompt: only these new ids are tokenized.

        With a chat template: the template's text after the assistant's stop token (ChatML's newline), then the
        difference between the conversation rendered through `messages` with the generation prompt and rendered
        through `history`. Without one, each message on its own line, a tool's as <tool_response>...</tool_response>.
        """
        if not self.chat:
            lines = [f"<tool_response>{m['content']}</tool_response>" if m["role"] == "tool" else m["content"]
                     for m in messages]
            return self._encode("\n" + "\n".join(lines) + "\n")
        base = self._render_text(list(history), generation_prompt=False)
        full = self._render_text([*history, *messages], generation_prompt=True)
        self._check_prefix(base, full)
        stops = [self.tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids]
        ends = [base.rfind(t) + len(t) for t in stops if t and t in base]
        tail = base[max(ends):] if ends else ""  # e.g. "\n" after <|im_end|>: not sampled, so the environment's
        return self._encode(tail + full[len(base):])

    def episode_example(self, item: Problem, turns: Sequence[dict]) -> Example:
        """An SFT example of a whole episode (assistant turns trained, the environment's masked), made by the very
        functions rlkit.algorithms.episodes renders a rollout with, so SFT traces and sampled episodes have the same ids."""
        ids = self.prompt_ids(item)
        mask, history, pending = [0] * len(ids), self.history(item), []
        for turn in turns:
            if turn["role"] != "assistant":
                pending.append(turn)
                continue
            if pending:
                if not history or history[-1]["role"] != "assistant":
                    raise RecipeError("data: an episode's environment turns must follow an assistant turn")
                env = self.env_ids(history, pending)
                ids, mask, history, pending = ids + env, mask + [0] * len(env), history + pending, []
            reply = self.assistant_ids(history, turn["content"])
            ids, mask = ids + reply, mask + [1] * len(reply)
            history = history + [turn]
        if pending or not any(mask):
            raise RecipeError("data: an episode must end with an assistant turn")
        return ids, mask

    def _check_prefix(self, start: str, whole: str) -> None:
        if not whole.startswith(start):
            raise RecipeError(
                "data.chat_template: the tokenizer's chat template does not render the start of a conversation as a "
                "prefix of the whole (it rewrites earlier turns), so an episode's earlier ids could not stay the "
                "sampled ones; use a template that appends turns, or data.chat_template=none")

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
        return self._encode(self._render_text(turns, generation_prompt))

    def _render_text(self, turns: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

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
