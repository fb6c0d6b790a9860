#!/usr/bin/env bash
# Creates .venv if missing, then runs the static gates and every test tier that can run on CPU,
# fastest first:
#   0. gates       (ruff check, ruff format --check, mypy, lint-imports: scripts/gates.sh; ~1-2 min
#                   on a cold mypy cache, seconds after; a finding stops here)
#   1. unit        (pure logic, ~1-2 min; a failure stops here)
#   2. integration (real Ray / vLLM / DeepSpeed processes; not slow)
#   3. slow        (whole jobs; gpu tests are collected here too and skip without CUDA)
# and prints each stage's wall time. Extra arguments go to pytest in every tier,
# e.g. ./scripts/test.sh -k learner  (a tier with no matching test is fine; no test at all is not).
# RLSYS_GATES=0 skips stage 0 (e.g. to run one test on a tree mid-edit); CI always runs it.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
source "$ROOT/scripts/gates.sh"

tiers=("unit|not integration and not slow and not gpu" "integration|integration and not slow"
       "slow|slow or gpu")
summary=()
ran_any=0
t_all=$(date +%s)
if [ "${RLSYS_GATES:-1}" = "0" ] && [ "${CI:-}" != "true" ]; then
  summary+=("gates: skipped (RLSYS_GATES=0)")
else
  say "stage gates: ruff check, ruff format --check, mypy, lint-imports"
  t0=$(date +%s)
  rc=0
  run_gates || rc=$?
  dt=$(( $(date +%s) - t0 ))
  if [ "$rc" -ne 0 ]; then
    summary+=("gates: FAILED (exit $rc) after ${dt} s")
    say "stage gates failed: the findings are above; no test tier run (docs/development.md, 'Gates')"
    printf '  %s\n' "${summary[@]}"
    exit "$rc"
  fi
  summary+=("gates: passed in ${dt} s")
fi
for tier in "${tiers[@]}"; do
  name="${tier%%|*}"; expr="${tier#*|}"
  say "tier $name: pytest -m \"$expr\""
  t0=$(date +%s)
  set +e
  python -m pytest -m "$expr" -p no:cacheprovider --durations=12 "$@"
  rc=$?
  set -e
  dt=$(( $(date +%s) - t0 ))
  case "$rc" in
    0) summary+=("$name: passed in ${dt} s"); ran_any=1 ;;
    5) summary+=("$name: no test selected (${dt} s)") ;;
    *) summary+=("$name: FAILED (pytest exit $rc) after ${dt} s")
       say "tier $name failed; later tiers not run"
       printf '  %s\n' "${summary[@]}"
       exit "$rc" ;;
  esac
done
say "all stages in $(( $(date +%s) - t_all )) s:"
printf '  %s\n' "${summary[@]}"
if [ "$ran_any" -eq 0 ]; then
  echo "pytest collected no tests in any tier: that is a failure, not a pass" >&2
  exit 1
fi
