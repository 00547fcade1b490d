"""Build the embedded default model (a small Llama with a character-level tokenizer) or load a Hugging Face one.

`model.path` is a local Hugging Face folder, a hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct: downloaded through
`huggingface_hub` when online, taken from its cache with HF_HUB_OFFLINE=1), or empty to build from `ModelConfig`'s
architecture fields. Everything here runs before a run folder is made, so a bad model path leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlkit.recipe import ModelConfig, RecipeError, looks_local

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# Printable ASCII plus newline: enough for arithmetic, puzzles, code and "I don't know".
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII character, decoded by concatenation.

    >>> tok = build_char_tokenizer()
    >>> tok.decode(tok("12+34=46")["input_ids"])
    '12+34=46'
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE with no merges splits text into single characters; Fuse joins them back without separators.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def build_model(cfg: ModelConfig, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A randomly initialised Llama-architecture model sized by `cfg`."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(cfg.init_seed)
    return LlamaForCausalLM(config)


MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # no .bin, .pt, .gguf


def resolve_model_path(path: str, field: str = "model.path") -> Path:
    """A local model folder for `path`: the folder itself, or a hub id's snapshot (downloaded when online)."""
    local = Path(path).expanduser()
    if looks_local(path):
        check_model_folder(local, field)
        return local
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(path, allow_patterns=MODEL_FILES))
    except Exception as e:  # offline, unknown repo, gated, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RecipeError(
            f"{field}: '{path}' is not a local folder and could not be fetched from the Hugging Face Hub ({reason}); "
            f"give a local model folder, or download it while online (hf download {path}) and set "
            "HF_HUB_OFFLINE=1") from e
    check_model_folder(folder, field)
    return folder


def check_model_folder(path: Path, field: str = "model.path") -> None:
    """A local Hugging Face model folder with a config and a tokenizer, or a RecipeError naming what is missing."""
    if not path.is_dir():
        raise RecipeError(f"{field}: '{path}' is not a folder; expected a local Hugging Face model folder or a hub id "
                          "such as Qwen/Qwen2.5-0.5B-Instruct")
    if not (path / "config.json").exists():
        raise RecipeError(f"{field}: '{path}' has no config.json; expected a Hugging Face model folder")
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise RecipeError(
            f"{field}: '{path}' has no tokenizer (tokenizer.json or tokenizer_config.json); "
            "save one beside the weights with tokenizer.save_pretrained(path)"
        )


def load_tokenizer(path: str | Path):
    """A model folder's tokenizer; one without a pad token pads with EOS (as TRL does; padding is never trained)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_context(cfg: ModelConfig, folder: str | Path | None) -> None:
    """model.max_seq_len must fit the loaded model's positions."""
    if not folder:
        return
    config = json.loads((Path(folder) / "config.json").read_text())
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if positions and cfg.max_seq_len > positions:
        raise RecipeError(f"model.max_seq_len: {cfg.max_seq_len} exceeds the model's context "
                          f"(max_position_embeddings={positions}); lower it")


def quiet_checkpoint_bars() -> None:
    """No progress bar for every checkpoint transformers writes or loads (each stage's, each resume point's, each
    sync's): a run's console shows its own bar. Hub downloads keep theirs."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars = not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # turns off huggingface_hub's bars too
    if hub_bars:
        enable_progress_bars()


def load_model_and_tokenizer(path: str | Path, dtype: torch.dtype = torch.float32, field: str = "model.path"):
    """Load a local Hugging Face checkpoint, failing with `field`, the folder and the missing file named."""
    check_model_folder(Path(path), field)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tokenizer


def init_model(cfg: ModelConfig, folder: str | Path | None = None, tokenizer=None):
    """The stage-0 model and tokenizer: loaded from `folder` (model.path resolved), or built from the
    architecture fields."""
    if folder:
        # in the checkpoint's own dtype: the run's copy (checkpoints/00_init) is no wider than the original, and
        # an engine serving bfloat16 reads it without a narrowing cast per weight
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        log.info("loaded model from %s (%s)", folder, model.dtype)
        return model, tokenizer or load_tokenizer(folder)
    tokenizer = tokenizer or build_char_tokenizer()
    model = build_model(cfg, len(tokenizer), tokenizer)
    n = sum(p.numel() for p in model.parameters())
    log.info("built a %.2fM-parameter Llama from config (vocab %d)", n / 1e6, len(tokenizer))
    return model, tokenizer


def save_checkpoint(model, tokenizer, path: str | Path, recipe_yaml: str, extra: dict | None = None) -> Path:
    """Save in Hugging Face format (safetensors + tokenizer) with the resolved recipe beside it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    if extra:
        (tmp / "rlkit_stage.json").write_text(json.dumps(extra, indent=2))
    # Rename last so a crash mid-write never leaves a half-written checkpoint under the final name.
    if path.exists():
        old = path.with_name(path.name + ".old")
        path.rename(old)
        tmp.rename(path)
        _rmtree(old)
    else:
        tmp.rename(path)
    return path


def checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face checkpoint folder, from one safetensors file or all of its shards."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise RecipeError(f"{path}: no .safetensors weights in this checkpoint folder")
    return {name: tensor for f in files for name, tensor in load_file(str(f)).items()}


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
