#!/usr/bin/env bash
# The static gates, the first stage of scripts/test.sh (and `make lint`, `make typecheck`, ...):
#   lint     ruff check             (rules and ignores: pyproject.toml [tool.ruff.lint])
#   format   ruff format --check    (the code is as `ruff format` writes it)
#   types    mypy                   (strict on the pure layers, basic elsewhere: [tool.mypy])
#   imports  lint-imports           (the layers and the purity contracts: [tool.importlinter])
# Each prints its findings; the first that fails stops the rest and exits non-zero.
# Usage: scripts/gates.sh [lint|format|types|imports ...]   (default: all four, in this order).
# Sourced by scripts/test.sh, which has already activated .venv; run directly it does that itself.
set -euo pipefail
if ! declare -F say >/dev/null; then
  source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
fi
cd "$ROOT"

gate_cmd() {
  case "$1" in
    lint) echo "ruff check --no-fix --output-format concise ." ;;
    format) echo "ruff format --check --output-format concise ." ;;
    types) echo "mypy" ;;
    imports) echo "lint-imports" ;;
    *) echo "unknown gate '$1' (lint, format, types, imports)" >&2; return 2 ;;
  esac
}

gate_hint() {
  case "$1" in
    lint) echo "fix them, or let ruff: ruff check --fix <files> (make lint-fix)" ;;
    format) echo "reformat: ruff format <files> (make format)" ;;
    types) echo "annotate or fix the types; a '# type: ignore[code]' needs a reason next to it" ;;
    imports) echo "an import crosses a layer or a purity rule: see docs/development.md, 'Gates'" ;;
  esac
}

# run_gates [names...]: runs them in order; prints one timing line per gate; returns the first failure.
run_gates() {
  local names=("$@") name cmd t0 dt rc
  [ "${#names[@]}" -gt 0 ] || names=(lint format types imports)
  for name in "${names[@]}"; do
    cmd="$(gate_cmd "$name")" || return 2
    t0=$(date +%s)
    set +e
    $cmd
    rc=$?
    set -e
    dt=$(( $(date +%s) - t0 ))
    if [ "$rc" -ne 0 ]; then
      say "gate $name FAILED ($cmd, exit $rc) after ${dt} s: $(gate_hint "$name")"
      return "$rc"
    fi
    say "gate $name: passed in ${dt} s ($cmd)"
  done
}

# Run directly (not sourced): the gates named on the command line, or all four.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  run_gates "$@"
fi
