import pytest

from tests.chat_model import build_chat_model


@pytest.fixture(scope="session")
def chat_model_path(tmp_path_factory) -> str:
    """A tiny Qwen2-architecture chat model with tied embeddings (tests/chat_model.py), built once per session."""
    return str(build_chat_model(tmp_path_factory.mktemp("chat") / "model", tie_embeddings=True))
