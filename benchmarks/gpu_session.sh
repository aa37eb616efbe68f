#!/usr/bin/env bash
# The whole device check of a session with a lent GPU, as two prepared commands (docs/gpu.md):
#
#   bash benchmarks/gpu_session.sh first    # (a) versions, (b) gpu/torchvision tests, (c) every method
#                                           # ~30 steps, probes + plan, (d) the NPID CIFAR-10 run
#                                           # with --time-limit inside this command's budget
#   bash benchmarks/gpu_session.sh resume   # (e) resume (d) to its end, final kNN JSON, summary
#
# Everything goes under $OUT: one log and one JSON per part, summary.md at the end. A failing part
# is recorded and the next one runs. The NPID run directory stays under $RUNS (kept on a warm
# machine between the two calls: run `resume` right after `first` returns).
#
# Everything is a variable, so that tests/test_gpu_session.py rehearses this very script on CPU with
# tiny sizes (DEVICE=cpu DATA=synthetic:N ... ) before any device minute is spent.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=${1:?usage: gpu_session.sh first|resume}
: "${OUT:?set OUT to the folder that receives the results}"
DATA=${DATA:-.carry/cifar10-jpeg.tar.gz}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
RUNS=${RUNS:-runs}
RUN=${RUN:-$RUNS/gpu_npid_softmax}
RESUME_TRAIN_S=${RESUME_TRAIN_S:-120}  # training seconds planned for the `resume` command
COMPILE_S=${COMPILE_S:-60}             # first-step compilation, paid inside --time-limit
MARGIN_S=${MARGIN_S:-45}               # last step + checkpoint + the JSON's kNN after --time-limit
# Wall seconds this command may take: `first` ~9 of the call's 10 minutes; `resume` what the plan
# gave it, plus start-up (data, compilation) and the margin.
if [ "$MODE" = resume ]; then BUDGET_S=${BUDGET_S:-$(( RESUME_TRAIN_S + COMPILE_S + MARGIN_S ))}; else BUDGET_S=${BUDGET_S:-480}; fi
MAX_EPOCHS=${MAX_EPOCHS:-200}          # the recipe's schedule; a shorter one only when it cannot fit
SMOKE_STEPS=${SMOKE_STEPS:-30}
PROBE_BATCHES=${PROBE_BATCHES:-128 256 512}
PROBE_STEPS=${PROBE_STEPS:-40}
WORKERS=${WORKERS:-8}
OPT_IMPL=${OPT_IMPL:-fused}
COMPILE=${COMPILE---compile}           # empty to run eagerly
KNN_EVERY=${KNN_EVERY:-20}
CKPT_EVERY_EPOCHS=${CKPT_EVERY_EPOCHS:-10}  # a 120-MB checkpoint per 2-s epoch would cost ~15% of the run
MIN_LIMIT_S=${MIN_LIMIT_S:-30}
TESTS=${TESTS:-tests}
SMOKE_ONLY=${SMOKE_ONLY:-}             # comma-separated subset of the smokes (default: all)
SMOKE_EXTRA=${SMOKE_EXTRA:-}           # more train flags for part (c) (the rehearsal shrinks the nets)
PROBE_EXTRA=${PROBE_EXTRA:-}           # more loader_throughput.py flags for the probes
RUN_EXTRA=${RUN_EXTRA:-}               # more train flags for part (d)

export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export INSTDISC_CACHE=${INSTDISC_CACHE:-.cache/instdisc}
PY=${PY:-python3}
T0=$(date +%s)
mkdir -p "$OUT" "$RUNS"
elapsed() { echo $(( $(date +%s) - T0 )); }
note() { echo "[gpu_session $MODE +$(elapsed)s] $*" | tee -a "$OUT/session.log"; }
# shellcheck disable=SC2086  # the *_EXTRA variables are word lists on purpose

if [ "$MODE" = first ]; then
  note "(a) device"
  $PY benchmarks/gpu_session.py device --json "$OUT/a_device.json" >"$OUT/a_device.log" 2>&1 || note "(a) failed"

  note "(b) gpu- and torchvision-marked tests"
  $PY -m pytest -q -p no:cacheprovider -m "gpu or torchvision" $TESTS >"$OUT/b_tests.log" 2>&1
  rc=$?
  # pytest exits 5 when no test is selected: that is not a failure of the machine.
  $PY - "$OUT" "$rc" <<'EOF'
import json, sys, pathlib
out, rc = pathlib.Path(sys.argv[1]), int(sys.argv[2])
lines = [l for l in (out / "b_tests.log").read_text().splitlines() if l.strip()]
(out / "b_tests.json").write_text(json.dumps({"rc": rc, "summary": lines[-1] if lines else ""}, indent=2) + "\n")
EOF
  note "(b) rc $rc"

  note "(c) every method for $SMOKE_STEPS steps"
  $PY benchmarks/gpu_session.py methods --data "$DATA" --device "$DEVICE" --precision "$PRECISION" \
    --steps "$SMOKE_STEPS" --runs "$RUNS" --only "$SMOKE_ONLY" --logs "$OUT" --json "$OUT/c_methods.json" -- $SMOKE_EXTRA \
    >"$OUT/c_methods.log" 2>&1 || note "(c) some method failed: see c_methods.json"

  note "(d) throughput probes: batch $PROBE_BATCHES"
  probes=()
  for b in $PROBE_BATCHES; do
    lr=$($PY -c "print(0.03 * $b / 128)")
    if $PY benchmarks/loader_throughput.py --config configs/npid_cifar10_softmax.yaml --data "$DATA" \
        --device "$DEVICE" --precision "$PRECISION" --optimizer-impl "$OPT_IMPL" --batch-size "$b" --set "lr=$lr" \
        --steps "$PROBE_STEPS" --warmup 5 --repeats 1 --workers "$WORKERS" --json "$OUT/probe_b$b.json" \
        $PROBE_EXTRA >"$OUT/probe_b$b.log" 2>&1; then
      probes+=("$OUT/probe_b$b.json")
    else
      note "(d) probe at batch $b failed"
    fi
  done
  left=$(( BUDGET_S - $(elapsed) ))
  first_train=$(( left - COMPILE_S - MARGIN_S ))
  if [ "$first_train" -lt "$MIN_LIMIT_S" ]; then
    note "(d) only ${left}s left: no time for the NPID run in this command"; exit 1
  fi
  if ! $PY benchmarks/gpu_session.py plan --probes "${probes[@]}" --first-train-s "$first_train" \
      --resume-train-s "$RESUME_TRAIN_S" --max-epochs "$MAX_EPOCHS" --json "$OUT/plan.json" --flags-out "$OUT/plan.flags" >"$OUT/plan.log" 2>&1; then
    note "(d) no plan: see plan.log"; exit 1
  fi
  limit_min=$($PY -c "print(round(max($left - $MARGIN_S, $MIN_LIMIT_S) / 60, 2))")
  note "(d) NPID run: $(cat "$OUT/plan.flags") --time-limit $limit_min"
  $PY benchmarks/gpu_cifar10.py --config configs/npid_cifar10_softmax.yaml --data "$DATA" --out "$RUN" \
    --json "$OUT/d_npid.json" --overwrite --device "$DEVICE" --precision "$PRECISION" --channels-last $COMPILE \
    --optimizer-impl "$OPT_IMPL" --knn-every "$KNN_EVERY" --ckpt-every-epochs "$CKPT_EVERY_EPOCHS" --time-limit "$limit_min" --no-progress \
    $(cat "$OUT/plan.flags") $RUN_EXTRA >"$OUT/d_npid.log" 2>&1 || note "(d) the run failed: see d_npid.log"
  note "(d) done"
elif [ "$MODE" = resume ]; then
  if [ ! -d "$RUN/checkpoints" ]; then
    note "(e) no run in $RUN to resume (the machine went back after 'first'?)"; exit 1
  fi
  limit_min=$($PY -c "print(round(max($BUDGET_S - $MARGIN_S, $MIN_LIMIT_S) / 60, 2))")
  note "(e) resume $RUN --time-limit $limit_min"
  $PY benchmarks/gpu_cifar10.py --config configs/npid_cifar10_softmax.yaml --data "$DATA" --out "$RUN" \
    --json "$OUT/e_npid_final.json" --resume --device "$DEVICE" --time-limit "$limit_min" --no-progress \
    >"$OUT/e_npid.log" 2>&1 || note "(e) failed: see e_npid.log"
  cp "$RUN/metrics.jsonl" "$OUT/e_metrics.jsonl" 2>/dev/null || true
  note "(e) done"
else
  echo "usage: gpu_session.sh first|resume" >&2; exit 2
fi
$PY benchmarks/gpu_session.py summary --out "$OUT" >"$OUT/summary.log" 2>&1 || note "summary failed"
note "end"
