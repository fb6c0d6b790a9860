#!/usr/bin/env bash
# Creates .venv if missing, then runs the main job on its embedded defaults: a short F-GRPO run of
# the built-in tiny model on a local, loopback-only Ray cluster (vLLM rollout worker, reward pool,
# DeepSpeed learner). Extra arguments are Hydra overrides, e.g.
#   ./scripts/quickstart.sh algo=grpo trainer.total_steps=5
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
say "running: python -m rlsys.train $*"
t0=$(date +%s)
python -m rlsys.train "$@"
say "finished in $(( $(date +%s) - t0 )) s"
