#!/usr/bin/env bash
# Regenerates requirements/dev.lock from requirements/dev.in: resolve the gate tools in a scratch venv,
# constrained by requirements/cpu.lock (a shared dependency keeps its runtime pin), and keep only the
# packages cpu.lock does not already pin. Like cpu.lock it is installed with --no-deps by scripts/_env.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
python3.11 -m venv "$SCRATCH/venv"
"$SCRATCH/venv/bin/python" -m pip install -q --upgrade pip
"$SCRATCH/venv/bin/python" -m pip install -q --dry-run --ignore-installed --report "$SCRATCH/report.json" \
  -c "$ROOT/requirements/cpu.lock" -r "$ROOT/requirements/dev.in"
"$SCRATCH/venv/bin/python" - "$ROOT" "$SCRATCH/report.json" > "$SCRATCH/lock" <<'PY'
import json, re, sys
root, report = sys.argv[1], sys.argv[2]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
pinned = {norm(l.split("==")[0]) for l in open(f"{root}/requirements/cpu.lock") if "==" in l}
print("# Development gate tools (ruff, mypy, import-linter, pre-commit) and their dependencies that")
print("# requirements/cpu.lock does not already pin; the shared ones resolve to cpu.lock's versions.")
print("# Installed with --no-deps by scripts/_env.sh after cpu.lock. Regenerate: scripts/lock_dev.sh.")
rows = {f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.load(open(report))["install"]
        if norm(i["metadata"]["name"]) not in pinned}
print("\n".join(sorted(rows, key=str.lower)))
PY
mv "$SCRATCH/lock" "$ROOT/requirements/dev.lock"
echo "wrote requirements/dev.lock ($(grep -c '==' "$ROOT/requirements/dev.lock") pins)"
