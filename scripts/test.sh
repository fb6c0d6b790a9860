#!/usr/bin/env bash
# Creates .venv if missing, then runs every test tier that can run on CPU, fast gate first:
#   1. unit        (pure logic, ~1-2 min; a failure stops here)
#   2. integration (real Ray / vLLM / DeepSpeed processes; not slow)
#   3. slow        (whole jobs; gpu tests are collected here too and skip without CUDA)
# and prints each tier's wall time. Extra arguments go to pytest in every tier,
# e.g. ./scripts/test.sh -k learner  (a tier with no matching test is fine; no test at all is not).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"

tiers=("unit|not integration and not slow and not gpu" "integration|integration and not slow"
       "slow|slow or gpu")
summary=()
ran_any=0
t_all=$(date +%s)
for tier in "${tiers[@]}"; do
  name="${tier%%|*}"; expr="${tier#*|}"
  say "tier $name: pytest -m \"$expr\""
  t0=$(date +%s)
  set +e
  python -m pytest -m "$expr" -p no:cacheprovider "$@"
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
say "all tiers in $(( $(date +%s) - t_all )) s:"
printf '  %s\n' "${summary[@]}"
if [ "$ran_any" -eq 0 ]; then
  echo "pytest collected no tests in any tier: that is a failure, not a pass" >&2
  exit 1
fi
