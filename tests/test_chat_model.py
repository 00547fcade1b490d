"""The test-time chat model (tests/chat_model.py) loads back as what it was built as."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tests.chat_model import GSM8K, VOCAB_SIZE, build_tokenizer, build_chat_model


def test_the_saved_tokenizer_encodes_as_the_built_one(chat_model_path):
    # transformers rebuilds a qwen2 folder's tokenizer as Qwen2Tokenizer, with Qwen's own pre-tokenizer: had the
    # BPE been trained with another one, every GSM8K text would encode differently after loading
    built, loaded = build_tokenizer(), AutoTokenizer.from_pretrained(chat_model_path)
    texts = [r["question"] + "\n" + r["answer"] for r in map(json.loads, GSM8K.read_text().splitlines())]
    assert [built(t).input_ids for t in texts] == [loaded(t).input_ids for t in texts]
    # Qwen's layout: the specials last, no BOS, <|im_end|> ends a turn
    assert len(loaded) == VOCAB_SIZE and loaded.bos_token_id is None
    assert (loaded.pad_token_id, loaded.eos_token_id) == (VOCAB_SIZE - 3, VOCAB_SIZE - 1)
    assert loaded.convert_ids_to_tokens([VOCAB_SIZE - 3, VOCAB_SIZE - 2, VOCAB_SIZE - 1]) == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_the_model_is_tied_or_not_as_asked_with_im_end_as_eos(chat_model_path, tmp_path):
    tied = AutoModelForCausalLM.from_pretrained(chat_model_path)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert 2e6 < sum(p.numel() for p in tied.parameters()) < 4e6
    assert GenerationConfig.from_pretrained(chat_model_path).eos_token_id == VOCAB_SIZE - 1 == tied.config.eos_token_id

    untied_path = build_chat_model(tmp_path / "untied", tie_embeddings=False)
    untied = AutoModelForCausalLM.from_pretrained(untied_path)
    assert not untied.config.tie_word_embeddings
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_building_is_deterministic(chat_model_path, tmp_path):
    again = build_chat_model(tmp_path / "again")
    first, second = load_file(f"{chat_model_path}/model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (again / "tokenizer.json").read_text() == open(f"{chat_model_path}/tokenizer.json").read()
