#!/usr/bin/env bash
# The healed search on SmolLM2 (sst2 by default), stage by stage through the CLI: the unhealed width search
# at the tolerance, then each deeper candidate healed HEAL_STEPS LoRA steps (the `sieve heal` recipe) before
# it is judged; then the chosen plan healed by `sieve heal` and the four models side by side on the test part:
# dense, dense healed (the same recipe, no pruning), pruned, pruned healed.
#
#     bash bench/healed_search.sh                          # sst2, 5%, uniform width search, 30 heal steps
#     TASK=mbpp STRATEGY=adaptive HEAL_STEPS=15 bash bench/healed_search.sh
#
# The workspace WORK/ws is reused (capture and fit run once); each stage's wall time and peak RSS go to
# WORK/times.txt, the four evaluations to WORK/eval-*.json. Torch runs THREADS threads (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
TASK="${TASK:-sst2}" TOLERANCE="${TOLERANCE:-0.05}" STRATEGY="${STRATEGY:-uniform}" HEAL_STEPS="${HEAL_STEPS:-30}"
WORK="${WORK:-/tmp/sieve-bench-healed/$TASK}" TOKENS="${TOKENS:-50000}"
export OMP_NUM_THREADS="${THREADS:-1}" MKL_NUM_THREADS="${THREADS:-1}"
mkdir -p "$WORK"
WS="$WORK/ws"
: > "$WORK/times.txt"

stage() {  # stage NAME COMMAND...: run it under GNU time, one line per stage in times.txt
  local name=$1
  shift
  /usr/bin/time -f "$name: wall %e s, peak RSS %M KiB" -a -o "$WORK/times.txt" "$@"
}

M=$(python -c "from sieve_cli.models import smollm2_gguf; print(smollm2_gguf())")
stage discover sieve -q discover "$M" -w "$WS"
stage capture sieve -q capture -w "$WS" --task "examples/tasks/$TASK.yaml" --tokens "$TOKENS"
stage fit sieve -q fit -w "$WS" --method width
stage search sieve -q search -w "$WS" --method width -s "$STRATEGY" --tolerance "$TOLERANCE" --heal-steps "$HEAL_STEPS"
stage heal sieve -q heal -w "$WS" --steps "$HEAL_STEPS"
stage apply sieve -q apply -w "$WS" -o "$WORK/pruned" --force
stage apply-healed sieve -q apply -w "$WS" -o "$WORK/pruned-healed" --healed --force
stage eval-dense sieve -q eval -w "$WS" --json > "$WORK/eval-dense.json"
stage eval-dense-healed sieve -q eval -w "$WS" --heal-dense "$HEAL_STEPS" --json > "$WORK/eval-dense-healed.json"
stage eval-pruned sieve -q eval -w "$WS" --model "$WORK/pruned" --json > "$WORK/eval-pruned.json"
stage eval-pruned-healed sieve -q eval -w "$WS" --model "$WORK/pruned-healed" --json > "$WORK/eval-pruned-healed.json"
cat "$WORK/times.txt"
python - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
plan = json.loads((work / "ws" / "search" / "plan.json").read_text())
for name in ("dense", "dense-healed", "pruned", "pruned-healed"):
    r = json.loads((work / f"eval-{name}.json").read_text())
    print(f"{name:14} {r['metric']} {r['value']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}] n={r['n']}")
healed = plan["search"]["healed"]
print("removed: %.2f%% of the model (%.2f%% of the prunable part; unhealed search: %.2f%% of the prunable part), "
      "%d heals, scale %.2f, confirm back-off %s" % (
          100 * plan["params"]["removed_fraction_model"], 100 * plan["params"]["removed_fraction_prunable"],
          100 * healed["unhealed_removed"], healed["heals"], healed["scale"],
          (plan["search"].get("confirm") or {}).get("back_off")))
EOF
