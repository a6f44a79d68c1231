#!/usr/bin/env bash
# The one device command: mlnet_jax's throughput and the PyTorch peer on the same card, one run,
# inside 9 minutes (BUDGET_S), so the ratios compare numbers from one card and one lease.
#
# Here, once per checkout (copies ../shared/bench/torch_peer.py and the wheels --pipeline needs,
# grain and array_record for Python 3.12, into .bench/, which .git/info/exclude ignores; ../shared
# does not travel to the device machine, .bench does when carried):
#     bash benchmarks/gpu_run.sh --prepare
# Then one call of the device tool's run:  command "bash benchmarks/gpu_run.sh",
#     carry [".bench"], timeout_s 600
# It writes into $OUT: peer_torch.json (the peer), jax_throughput.json (ours), <date>-<card>.json
# (merged: card, train/predict ratios vs torch.compile, every target with pass/fail), run.log,
# env.txt (versions, nvidia-smi before and after), gpu_samples.csv (clocks, power and
# temperature every 0.5 s, with timestamps to set beside run.log's) and topology-<card>.pb (the
# card's description, written by throughput.py, for deviceless.py --card); the comparison table is
# printed after ours, then the predict command's host path by worker count.
# Order: the peer first (bounded by its own --deadline and a timeout), then ours with a
# --deadline from the time left, so an overrun loses only the lowest-priority measurements.
# Knobs: BUDGET_S (560), CASES (16x240x320,32x480x640), PEER (.bench/torch_peer.py, else
# ../shared/bench/torch_peer.py), PEER_CASES (= CASES), PEER_DEADLINE (120), DEADLINE_MARGIN
# (120: no new measurement starts later than this before the budget's end), PIPELINE_WORKERS
# (0,4), VARIANTS (default: v3, the code before the last adopted lever, conv1_1 as a Pallas
# kernel, so its gain is measured in the same run; unmeasured candidates go after it, most
# promising first, so the deadline cuts the least),
# DUMP (1: the optimised HLO of each executable, as $OUT/dumps.tar.gz), PROFILE (1: per-kernel
# device time of the headline train step and predict, traces as $OUT/profile.tar.gz),
# JAX_ARGS (extra throughput.py flags), XLA_FLAGS (recorded), PREDICT_HOST (1, 0 with
# FOCUS=levers: benchmarks/predict_host.py at the end, PREDICT_HOST_ARGS its flags).
# FOCUS=levers (its cases: CASES_FOCUS, default 32x480x640; CASES is not read): only what judges candidate levers (the headline 32x480x640 bf16 full fine-tune
# and predict beside the peer's, the profile, the variants): no probes, pipeline, frozen, sweep
# or float32, which the committed results already hold; about 7 minutes, the deadline cutting
# the variants that do not fit.
set -uo pipefail
cd "$(dirname "$0")/.."
BENCH=.bench
CASES=${CASES:-16x240x320,32x480x640}
# The sweep's 64-image point (690.7 images/s, 2026-11-26) costs ~100 s of compiling and timing:
# left out, so the predict command's host path at the end gets its time.
SCOPE=(--dtypes bfloat16,float32 --modes full,frozen --batch-sweep --sweep-batches 8,16)
if [ "${FOCUS:-}" = levers ]; then
  CASES=${CASES_FOCUS:-32x480x640}
  SCOPE=(--dtypes bfloat16 --modes full --no-compile-cache)
  PIPELINE_WORKERS=""
  PREDICT_HOST=${PREDICT_HOST:-0}
fi

if [ "${1:-}" = "--prepare" ]; then
  set -e
  mkdir -p "$BENCH/wheels"
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF "/$BENCH/" "$exclude" 2>/dev/null || echo "/$BENCH/" >> "$exclude"
  cp "${PEER_SOURCE:-../shared/bench/torch_peer.py}" "$BENCH/torch_peer.py"
  # The device image has absl, cloudpickle, etils, numpy, protobuf and psutil; not these three.
  ${PYTHON:-python3} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$BENCH/wheels" grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
  git check-ignore -q "$BENCH/torch_peer.py" || { echo "$BENCH is not ignored" >&2; exit 1; }
  du -sh "$BENCH"; ls "$BENCH" "$BENCH/wheels"
  echo "ready: run tool, command 'bash benchmarks/gpu_run.sh', carry [\"$BENCH\"], timeout_s 600"
  exit 0
fi

: "${OUT:=$(mktemp -d)}"
export OUT PYTHONUNBUFFERED=1
BUDGET=${BUDGET_S:-560}
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
log() { echo "[gpu_run $(( $(date +%s) - START ))s $(date -u +%T)] $*" | tee -a "$OUT/run.log"; }

EXTRA_ARGS=()
VARIANTS=${VARIANTS-v3}
[ -n "$VARIANTS" ] && EXTRA_ARGS+=(--variants "$VARIANTS")
# Dumps and traces are written outside $OUT and packed into it at the end: the device tool
# brings back only a few files, not deeply nested, so if the run is cut short the JSON files
# in $OUT still come back (the dumps and traces are lost with the cut instead).
ART=$(mktemp -d)
[ "${PROFILE:-1}" = 1 ] && EXTRA_ARGS+=(--profile "$ART/profile")
if [ "${DUMP:-1}" = 1 ]; then
  mkdir -p "$ART/dumps"
  EXTRA_ARGS+=(--dump-dir "$ART/dumps")
fi

{
  date -u; uname -a; nproc
  nvidia-smi || true
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv || true
  python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|numpy|pillow|torch|triton|nvidia-cudnn|grain)' || true
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
} > "$OUT/env.txt" 2>&1

# The card's clocks, power and temperature every 0.5 s for the whole run, the peer's part
# included (throughput.py also samples each timed measurement on its own).
SMI_LOG=""
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu \
    --format=csv --loop-ms=500 > "$OUT/gpu_samples.csv" 2>/dev/null &
  SMI_LOG=$!
fi

PIPE_ARGS=(--pipeline --pipeline-workers "${PIPELINE_WORKERS-0,4}")
[ -z "${PIPELINE_WORKERS-0,4}" ] && PIPE_ARGS=()
if [ ${#PIPE_ARGS[@]} -gt 0 ] && compgen -G "$BENCH/wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$BENCH"/wheels/*.whl >> "$OUT/env.txt" 2>&1 \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ${#PIPE_ARGS[@]} -gt 0 ] && ! python3 -c "import grain, array_record; print('grain', grain.__version__)" \
    >> "$OUT/env.txt" 2>&1; then
  log "grain is not importable (carry .bench after --prepare): --pipeline skipped"
  PIPE_ARGS=()
fi

PEER=${PEER:-$BENCH/torch_peer.py}
[ -f "$PEER" ] || PEER=../shared/bench/torch_peer.py
if [ -f "$PEER" ]; then
  PD=${PEER_DEADLINE:-120}
  log "PyTorch peer: $PEER --cases ${PEER_CASES:-$CASES} --deadline $PD"
  timeout -k 5 $(( PD + 60 )) python3 "$PEER" --cases "${PEER_CASES:-$CASES}" --deadline "$PD" \
    2>&1 | tee -a "$OUT/run.log"
else
  log "no torch_peer.py (run 'bash benchmarks/gpu_run.sh --prepare' here first): ratios will be null"
fi

L=$(left)
KILL=$(( L - 20 > 60 ? L - 20 : 60 ))     # leave time to merge; never 0 (= no limit)
MARGIN=${DEADLINE_MARGIN:-120}
DEADLINE=$(( L - MARGIN > 30 ? L - MARGIN : 30 ))  # a case started by then has MARGIN-20 s to finish
log "mlnet_jax throughput: ${L}s left, --deadline $DEADLINE, killed after ${KILL}s"
# shellcheck disable=SC2086
timeout -k 5 "$KILL" python3 benchmarks/throughput.py --cases "$CASES" \
  "${SCOPE[@]}" "${PIPE_ARGS[@]}" \
  --deadline "$DEADLINE" --output "$OUT/jax_throughput.json" "${EXTRA_ARGS[@]}" ${JAX_ARGS:-} \
  2>&1 | tee -a "$OUT/run.log"

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv >> "$OUT/env.txt" 2>&1 || true
[ -n "$SMI_LOG" ] && kill "$SMI_LOG" 2>/dev/null
if [ -f "$OUT/jax_throughput.json" ]; then
  python3 benchmarks/merge_results.py --jax "$OUT/jax_throughput.json" \
    --torch "$OUT/peer_torch.json" --out-dir "$OUT" 2>&1 | tee -a "$OUT/run.log"
else
  log "no jax_throughput.json: see run.log"
fi
# The predict command's host path by worker count (~40 s), when time is left: the 2026-11-27
# run's folder path made 64 images/s from 8 threads on this machine's 16 cores, and 2 cores
# here make ~150-250; with a device that answers at once, then with the batches sent through
# JAX to the GPU without the model (--devices jax), so that the run says whether the host or
# the device path holds a folder run back; its table goes to run.log (the tool brings back at
# most 8 files).
if [ "${PREDICT_HOST:-1}" = 1 ] && [ "$(left)" -gt 60 ]; then
  log "predict command's host path: benchmarks/predict_host.py ${PREDICT_HOST_ARGS:=--images 64 --workers 1 4 8 16 --repeats 2 --devices instant jax}"
  # shellcheck disable=SC2086
  timeout -k 5 $(( $(left) - 20 )) python3 benchmarks/predict_host.py $PREDICT_HOST_ARGS \
    2>&1 | tee -a "$OUT/run.log"
elif [ "${PREDICT_HOST:-1}" = 1 ]; then
  log "predict_host skipped: $(left)s left, it needs more than 60"
fi
for d in dumps profile; do  # one file back instead of one per executable or trace
  [ -d "$ART/$d" ] && tar -C "$ART" -czf "$OUT/$d.tar.gz" "$d"
done
rm -rf "${ART:?}"
log "done in $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
