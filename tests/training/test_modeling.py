import pytest
import torch

from rlkit.recipe import ModelConfig, RecipeError
from rlkit.training.modeling import build_char_tokenizer, init_model, load_model_and_tokenizer, save_checkpoint


def test_char_tokenizer_round_trips_text():
    tok = build_char_tokenizer()
    text = "12+345=357\nI don't know. (x*y)"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_checkpoint_is_hugging_face_format_with_recipe(tmp_path):
    model, tok = init_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2))
    path = save_checkpoint(model, tok, tmp_path / "ckpt", "trainer: {lr: 0.1}\n", {"stage": 0})
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert (path / "recipe.yaml").read_text() == "trainer: {lr: 0.1}\n"
    loaded, tok2 = load_model_and_tokenizer(path)
    ids = torch.tensor([tok2.encode("12+3=", add_special_tokens=False)])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    # saving again replaces the checkpoint whole
    save_checkpoint(model, tok, path, "x: 1\n")
    assert (path / "recipe.yaml").read_text() == "x: 1\n" and not (tmp_path / "ckpt.tmp").exists()


def test_model_path_without_tokenizer_is_named(tmp_path):
    model, _ = init_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2))
    model.save_pretrained(tmp_path)
    with pytest.raises(RecipeError, match="has no tokenizer"):
        load_model_and_tokenizer(tmp_path)


def test_missing_model_path(tmp_path):
    with pytest.raises(RecipeError, match="model.path: .* is not a folder"):
        load_model_and_tokenizer(tmp_path / "nope")


def test_a_checkpoints_tensors_are_read_from_all_its_shards(tmp_path):
    """save_pretrained splits a model past max_shard_size into shards; checkpoint_state reads every one, so a 7B
    checkpoint averages and branches (a stage's `start`) as a small one does."""
    from rlkit.training.modeling import checkpoint_state

    model, _ = init_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    state = checkpoint_state(tmp_path / "sharded")
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
    with pytest.raises(RecipeError, match="no .safetensors weights"):
        checkpoint_state(tmp_path)
