"""A tiny Qwen2.5-style chat model built at test time: a byte-level BPE tokenizer with ChatML, random weights.

It stands in for a real instruct checkpoint where the embedded character-level Llama cannot: a tokenizer that
merges bytes, a chat template, no BOS, `<|im_end|>` (not `</s>`) as the stop token, optionally tied embeddings.
Nothing is downloaded: the tokenizer is trained on the vendored GSM8K file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

GSM8K = Path(__file__).resolve().parents[1] / "data" / "gsm8k_test.jsonl"
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VOCAB_SIZE = 1536  # 256 bytes + merges, then the 3 specials at the end (as in Qwen's vocabulary)
TRAIN_LINES = 400  # ~230 KB of GSM8K: a vocabulary in well under a second on 2 cores
# Qwen2's pre-tokenizer (transformers' Qwen2Tokenizer rebuilds it on load): digits split one by one
SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen2.5-Instruct's template without its default system prompt and tool calls.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2/Qwen style) trained on GSM8K questions and answers.

    >>> tok = build_tokenizer()
    >>> text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
    ...                                tokenize=False)
    >>> text
    '<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n'
    >>> ids = tok(text, add_special_tokens=False).input_ids
    >>> ids[0] == tok.convert_tokens_to_ids("<|im_start|>"), tok.decode(ids) == text, tok.bos_token_id
    (True, True, None)
    """
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:TRAIN_LINES]]
    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 3, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown token needed
    )
    core.train_from_iterator((r["question"] + "\n" + r["answer"] for r in rows), trainer=trainer)
    # Added last, so they take the top ids: <|im_end|> is not the embedded Llama's </s> (2), nor pad 0.
    core.add_special_tokens([PAD, IM_START, IM_END])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=IM_END, bos_token=None,
        extra_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )


def _build_model(tokenizer: PreTrainedTokenizerFast, tie_embeddings: bool, seed: int) -> Qwen2ForCausalLM:
    """Random Qwen2 of about 2.8M parameters; head_dim 64 (vLLM's CPU attention rejects 16)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie_embeddings, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # seeded without moving the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    # Qwen2.5-Instruct stops generation at <|im_end|> through generation_config.json
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def build_chat_model(path: str | Path, *, tie_embeddings: bool = True, seed: int = 0) -> Path:
    """Write the tokenizer and a randomly initialised model to `path` (a loadable Hugging Face folder)."""
    path = Path(path)
    tokenizer = build_tokenizer()
    _build_model(tokenizer, tie_embeddings, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
