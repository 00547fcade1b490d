import pytest

from rlkit.config import ModelConfig
from rlkit.modeling import init_model, save_checkpoint


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """A tiny randomly initialised Llama checkpoint with the character tokenizer."""
    model, tok = init_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    return str(save_checkpoint(model, tok, tmp_path_factory.mktemp("m") / "ckpt", ""))
