import pytest

from rlkit.recipe import ModelConfig
from rlkit.training.modeling import init_model, save_checkpoint
from tests.chat_model import build_chat_model


@pytest.fixture(scope="session")
def chat_model_path(tmp_path_factory) -> str:
    """A tiny Qwen2-architecture chat model with tied embeddings (tests/chat_model.py), built once per session."""
    return str(build_chat_model(tmp_path_factory.mktemp("chat") / "model", tie_embeddings=True))


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """A tiny randomly initialised Llama checkpoint with the character tokenizer."""
    model, tok = init_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    return str(save_checkpoint(model, tok, tmp_path_factory.mktemp("m") / "ckpt", ""))
