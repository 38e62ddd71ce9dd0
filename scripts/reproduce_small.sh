#!/usr/bin/env bash
# The papers' claims at small scale, measured: every run, its reports, and docs/results.md.
#
#   scripts/reproduce_small.sh [-o ROOT] [-r RESULTS] [--] [overrides for every training run...]
#
# Five parts, each reported by `slm report` (tables, "against CLM", plots) under ROOT/reports/:
#   methods  CLM, random, ESLM (loss and entropy), Ada-ESLM and ESLM-KD at two model sizes (SIZE_A,
#            SIZE_B), STEPS steps, SEEDS seeds each; at SIZE_A also hierarchical ESLM and ESLM with a
#            warm start (loss and entropy: CLM for the first quarter of the steps); CLM also at CLM_FRACTIONS of the
#            steps, so that every method meets CLM at the same nominal and realised FLOPs; a keep sweep
#            (KEEPS) of random, ESLM and ESLM-entropy at SIZE_A with SWEEP_SEEDS. The ESLM-KD teacher
#            is SIZE_B trained for twice the steps.
#   lengths  the SIZE_A comparison (without KD) and CoCoNTs again at each of LENGTHS steps, LONG_SEEDS
#            seeds each: does the verdict change with length?
#   rho1     RHO-1 on a noisy mixture: clean WikiText-2 + the same text with its words shuffled +
#            Tiny Shakespeare; the reference trains on clean WikiText-2 test text; CLM, random and
#            RHO-1 at RATIO, and CLM and random on RHO-1's window grid (data.window_grid), evaluated on
#            held-out clean text (val/wiki/loss), at STEPS (SEEDS) and, without random on the grid, at
#            the longest of LENGTHS (LONG_SEEDS). These corpora are the vendored ones whatever DATA says.
#   coconts  CoCoNTs (n-gram soft targets) against CLM at SIZE_A: steps to CLM's loss.
#   tasks    every final model of the main comparisons on slm's offline downstream tasks
#            (`slm eval tasks=TASKS`, written to <run>/eval/).
# Then `python -m slm_cli.report.results` writes the reports and RESULTS (default docs/results.md).
#
# Settings (environment variables; the defaults take about three hours on a 2-core CPU, docs/results.md
# states the time measured):
#   STEPS=200  SEEDS="1 2 3"  LENGTHS="400 1600"  LONG_SEEDS="1 2"  TASKS=slm_local
#   SWEEP_SEEDS="1"  KEEPS="0.2 0.4 0.8"  KEEP=0.6  RATIO=0.6
#   CLM_FRACTIONS="0.4 0.6 0.8"  LANES=2 (runs side by side, each with nproc/LANES threads)
#   SIZE_A="model=gpt2-nano"  SIZE_B="model=gpt2-nano model.n_embd=256"
#   DATA="data=wikitext2 data.vocab_size=4096"  BATCH="data.batch_size=16 model.block_size=128"
#   SLM=slm (e.g. SLM=.venv/bin/slm)
# Scaling up changes only these and the overrides, e.g. on a GPU node:
#   STEPS=20000 LANES=1 SIZE_A="model=gpt2" SIZE_B="model=gpt2-medium" \
#   DATA="data=openwebtext" BATCH="data.batch_size=16 data.global_batch_size=480" \
#   scripts/reproduce_small.sh -o outputs/reproduce_gpt2 -r outputs/reproduce_gpt2/results.md trainer=gpu
set -euo pipefail
cd "$(dirname "$0")/.."

root="outputs/reproduce_small/$(date +%Y-%m-%d_%H-%M-%S)"
results="docs/results.md"
usage() { sed -n '2,/^set -euo pipefail/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; }
while getopts "o:r:h" opt; do
  case "$opt" in
    o) root="$OPTARG" ;;
    r) results="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
extra=("$@")

STEPS=${STEPS:-200}
SEEDS=${SEEDS:-"1 2 3"}
LENGTHS=${LENGTHS:-"400 1600"}
LONG_SEEDS=${LONG_SEEDS:-"1 2"}
TASKS=${TASKS:-slm_local}
SWEEP_SEEDS=${SWEEP_SEEDS:-"1"}
KEEPS=${KEEPS:-"0.2 0.4 0.8"}
KEEP=${KEEP:-0.6}
RATIO=${RATIO:-0.6}
CLM_FRACTIONS=${CLM_FRACTIONS:-"0.4 0.6 0.8"}
LANES=${LANES:-2}
SIZE_A=${SIZE_A:-"model=gpt2-nano"}
SIZE_B=${SIZE_B:-"model=gpt2-nano model.n_embd=256"}
DATA=${DATA:-"data=wikitext2 data.vocab_size=4096"}
BATCH=${BATCH:-"data.batch_size=16 model.block_size=128"}
read -r -a slm <<< "${SLM:-slm}"
# the Python beside slm (for the noise file and the results page), unless PYTHON says otherwise
python=${PYTHON:-$(dirname "$(command -v "${slm[0]}" || echo python3)")/python}
[ -x "$python" ] || python=python3
[ "$STEPS" -ge 20 ] 2>/dev/null || { echo "reproduce_small.sh: error: STEPS=$STEPS must be an integer >= 20" >&2; exit 2; }

root=$(mkdir -p "$root" && cd "$root" && pwd)
threads=$(( $(nproc) / LANES )); [ "$threads" -ge 1 ] || threads=1
join() { local IFS=,; echo "$*"; }
minus() { awk -v k="$1" 'BEGIN { printf "%.6g\n", 1 - k }'; }
# shellcheck disable=SC2086  # the space-separated settings are split into overrides on purpose
read -r -a size_a <<< "$SIZE_A"; read -r -a size_b <<< "$SIZE_B"
read -r -a data <<< "$DATA"; read -r -a batch <<< "$BATCH"
val_every=$(( STEPS / 10 ))
paths=("paths.data_dir=$root/data" "paths.log_dir=$root/outputs")
# every training run: the batch, validation 10 times a run (8 batches, all of WikiText-2's held-out
# windows; of each source in a mixture), a checkpoint only at the end (the corpus
# comes with each call: DATA, or the RHO-1 mixture)
common=("${batch[@]}" "${paths[@]}" "trainer.max_steps=$STEPS" "trainer.val_check_interval=$val_every"
        "trainer.log_every_n_steps=5" "trainer.checkpoint_every_n_steps=$(( 100 * STEPS ))"
        "trainer.enable_progress_bar=false")

# sweep_size OVERRIDES...: how many jobs a Hydra multirun of these overrides makes (the product of the
# lengths of its comma lists; a value in braces or brackets is one value)
sweep_size() {
  local n=1 arg value
  for arg in "$@"; do
    value=${arg#*=}
    case "$value" in *"{"*|*"["*) continue ;; esac
    n=$(( n * $(awk -F, '{ print NF }' <<< "$value") ))
  done
  echo "$n"
}
# train DIR OVERRIDES...: one Hydra multirun into DIR (skipped when every job of it has a summary)
train() {
  local dir=$1; shift
  local done_=0
  [ -d "$dir" ] && done_=$(find "$dir" -mindepth 2 -maxdepth 2 -regex '.*/[0-9]+/summary.json' | wc -l)
  if [ "$done_" -ge "$(sweep_size "${common[@]}" "$@" "${extra[@]}")" ]; then
    echo "== $dir: done before, kept"; return
  fi
  echo "== $dir: $*"
  OMP_NUM_THREADS=$threads "${slm[@]}" train -m "${common[@]}" "$@" "hydra.sweep.dir=$dir" "${extra[@]}"
}
train_one() {  # train_one DIR OVERRIDES...: one run into DIR (skipped when it has a summary)
  local dir=$1; shift
  [ -f "$dir/summary.json" ] && { echo "== $dir: done before, kept"; return; }
  echo "== $dir: $*"
  OMP_NUM_THREADS=$threads "${slm[@]}" train "${common[@]}" "$@" "hydra.run.dir=$dir" "${extra[@]}"
}

seeds=$(join $SEEDS)
long_seeds=$(join $LONG_SEEDS)
alpha=$(minus "$KEEP")
teacher="$root/methods/teacher"
longest=$(for l in $LENGTHS; do echo "$l"; done | sort -n | tail -1)
length() {  # length STEPS: the overrides of a run of that many steps (validation 10 times)
  echo "trainer.max_steps=$1 trainer.val_check_interval=$(( $1 / 10 )) trainer.checkpoint_every_n_steps=$(( 100 * $1 ))"
}

comparison() {  # comparison DIR SEEDS STEPS OVERRIDES...: the methods of both sizes, one sweep each
  local dir=$1 s=$2 n=$3 len; shift 3
  read -r -a len <<< "$(length "$n")"
  set -- "$@" "${len[@]}" "seed=$s"
  train "$dir/clm" "$@" selection=clm
  train "$dir/random" "$@" selection=random "selection.ratio=$KEEP"
  train "$dir/eslm" "$@" selection=eslm "selection.alpha=$alpha"
  train "$dir/eslm_entropy" "$@" selection=eslm selection.score=entropy "selection.alpha=$alpha"
  train "$dir/ada_eslm" "$@" selection=ada_eslm
}
instances() {  # instances DIR SEEDS STEPS OVERRIDES...: hierarchical ESLM
  local dir=$1 s=$2 n=$3 len; shift 3
  read -r -a len <<< "$(length "$n")"
  train "$dir/hier_eslm" "$@" "${len[@]}" "seed=$s" selection=hier_eslm "selection.alpha=$alpha"
}
warm_starts() {  # warm_starts DIR SEEDS STEPS OVERRIDES...: ESLM after CLM for the first quarter
  local dir=$1 s=$2 n=$3 len warm; shift 3
  read -r -a len <<< "$(length "$n")"
  warm="trainer.selection_start_step=$(( n / 4 ))"
  set -- "$@" "${len[@]}" "seed=$s" "$warm" "selection.alpha=$alpha"
  train "$dir/eslm_warm" "$@" selection=eslm
  train "$dir/eslm_entropy_warm" "$@" selection=eslm selection.score=entropy
}
methods() {  # methods SIZE_NAME SIZE_OVERRIDES...: the methods at one size, SEEDS seeds each
  local name=$1; shift
  comparison "$root/methods/$name" "$seeds" "$STEPS" "${data[@]}" "$@"
  if [ "$name" = a ]; then
    instances "$root/methods/a" "$seeds" "$STEPS" "${data[@]}" "$@"
    warm_starts "$root/methods/a" "$seeds" "$STEPS" "${data[@]}" "$@"
  fi
}
lengths() {  # lengths STEPS...: the SIZE_A comparison and CoCoNTs at these lengths, LONG_SEEDS seeds each
  local n len
  for n in "$@"; do
    comparison "$root/lengths/L$n" "$long_seeds" "$n" "${data[@]}" "${size_a[@]}"
    instances "$root/lengths/L$n" "$long_seeds" "$n" "${data[@]}" "${size_a[@]}"
    read -r -a len <<< "$(length "$n")"
    OMP_NUM_THREADS=$threads "${slm[@]}" ngram "${data[@]}" "${paths[@]}" ngram.n=4 ngram.r=8  # up to date: a no-op
    train "$root/lengths/L$n/coconts" "${data[@]}" "${size_a[@]}" "${len[@]}" selection=clm target=coconts \
      target.n=4 target.r=8 "seed=$long_seeds"
  done
}
downstream() {  # downstream DIR...: the finished runs of the main comparisons below DIR on TASKS
  local run    # (not CLM's shorter runs nor the keep sweep; skipped when done before)
  for run in $(find "$@" -name summary.json -not -path '*/clm_steps*' -not -path '*_keeps/*' -printf '%h\n' \
               2>/dev/null | sort); do
    [ -d "$run/eval" ] && [ -n "$(ls -A "$run/eval")" ] && continue
    OMP_NUM_THREADS=$threads "${slm[@]}" eval "ckpt_path=$run" "tasks=$TASKS" > /dev/null \
      || echo "reproduce_small.sh: downstream evaluation of $run failed" >&2
  done
}
eslm_kd() {  # eslm_kd SIZE_NAME SIZE_OVERRIDES...: after the teacher
  local name=$1; shift
  set -- "${data[@]}" "$@"
  for _ in $(seq 720); do [ -f "$teacher/summary.json" ] && break; sleep 5; done
  [ -f "$teacher/summary.json" ] || { echo "reproduce_small.sh: error: no teacher at $teacher after 1 h" >&2; return 1; }
  train "$root/methods/$name/eslm_kd" "$@" selection=eslm "selection.alpha=$alpha" target=kd \
    "target.teacher=$teacher" "seed=$seeds"
}
clm_budgets() {  # clm_budgets SIZE_NAME SIZE_OVERRIDES...: CLM with fewer steps, for matched FLOPs
  local name=$1; shift
  set -- "${data[@]}" "$@"
  local f steps
  for f in $CLM_FRACTIONS; do
    steps=$(awk -v f="$f" -v s="$STEPS" -v v="$val_every" 'BEGIN { printf "%d", int(f * s / v + 0.5) * v }')
    train "$root/methods/$name/clm_steps$steps" "$@" selection=clm "trainer.max_steps=$steps" "seed=$seeds"
  done
}
keep_sweep() {  # the keep ratios KEEPS at SIZE_A
  local ratios alphas
  ratios=$(join $KEEPS)
  alphas=$(join $(for k in $KEEPS; do minus "$k"; done))
  local dir="$root/methods/a"
  set -- "${data[@]}" "${size_a[@]}"
  train "$dir/random_keeps" "$@" selection=random "selection.ratio=$ratios" "seed=$(join $SWEEP_SEEDS)"
  train "$dir/eslm_keeps" "$@" selection=eslm "selection.alpha=$alphas" "seed=$(join $SWEEP_SEEDS)"
  train "$dir/eslm_entropy_keeps" "$@" selection=eslm selection.score=entropy \
    "selection.alpha=$alphas" "seed=$(join $SWEEP_SEEDS)"
}
rho1() {  # RHO-1 on a noisy mixture
  local dir="$root/rho1" reference="$root/rho1_reference"
  mkdir -p "$dir/noise"
  # noise: every line of the clean text with its words in a random order (same words, no language)
  "$python" - "$dir/noise/shuffled.txt" <<'EOF'
import random, sys
from pathlib import Path
import slm_cli.corpora as corpora
text = (Path(corpora.__file__).parent / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
rng = random.Random(0)
lines = []
for line in text.splitlines():
    words = line.split()
    rng.shuffle(words)
    lines.append(" ".join(words))
out = Path(sys.argv[1])
tmp = out.with_suffix(".tmp")
tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
tmp.replace(out)
EOF
  # the reference: SIZE_A with CLM on clean text the training never sees (WikiText-2's test split)
  # (the mixture and the reference's text are the vendored corpora whatever DATA is)
  train_one "$reference" data=wikitext2 data.vocab_size=4096 "data.path=\${corpus:wikitext-2/test.txt}" \
    data.name=wikitext2-test "${size_a[@]}" selection=clm "trainer.max_steps=$(( STEPS * 3 / 2 ))" seed=0
  local mix=(data=mix data.name=noisy-mix "data.tokenizer=$reference"
             data.sources.wiki.weight=0.5 data.sources.shakespeare.weight=0.2
             "+data.sources.shuffled={data: text, path: $dir/noise/shuffled.txt, sample_by: line, weight: 0.3}")
  if [ ! -d "$root/data/noisy-mix/ref-rho1_reference" ]; then
    OMP_NUM_THREADS=$threads "${slm[@]}" score "${mix[@]}" "${paths[@]}" "ckpt_path=$reference"
  fi
  rho1_runs "$dir" "$seeds" "$STEPS" "${mix[@]}"
  rho1_runs "$dir/L$longest" "$long_seeds" "$longest" "${mix[@]}"
}
rho1_runs() {  # rho1_runs DIR SEEDS STEPS MIX...: RHO-1 and its baselines, also on RHO-1's window grid
  local dir=$1 s=$2 n=$3 len; shift 3
  read -r -a len <<< "$(length "$n")"
  local block grid  # RHO-1 trains on its scores' grid of model.block_size: the baselines' grid too
  block=$("${slm[@]}" train "${size_a[@]}" "${batch[@]}" "${extra[@]}" --cfg job --package model | sed -n 's/^block_size: //p')
  grid="data.window_grid=$block"
  set -- "$@" "${size_a[@]}" "${len[@]}" "seed=$s"
  train "$dir/clm" "$@" selection=clm
  train "$dir/random" "$@" selection=random "selection.ratio=$RATIO"
  train "$dir/rho1" "$@" selection=rho1 "selection.ratio=$RATIO"
  train "$dir/clm_grid" "$@" selection=clm "$grid"
  if [ "$s" = "$seeds" ]; then
    train "$dir/random_grid" "$@" selection=random "selection.ratio=$RATIO" "$grid"
  fi
}
coconts() {  # CoCoNTs against SIZE_A's CLM runs
  OMP_NUM_THREADS=$threads "${slm[@]}" ngram "${data[@]}" "${paths[@]}" ngram.n=4 ngram.r=8
  train "$root/coconts/coconts" "${data[@]}" "${size_a[@]}" selection=clm target=coconts target.n=4 target.r=8 "seed=$seeds"
}

echo "reproduce_small: $root (STEPS=$STEPS SEEDS=\"$SEEDS\" LANES=$LANES, $threads threads each)"
start=$(date +%s)
OMP_NUM_THREADS=$(nproc) "${slm[@]}" prepare "${data[@]}" "${paths[@]}"
# two lanes of about equal length: the teacher comes first in lane 1, ESLM-KD last in lane 2
# (lane 1: the teacher, size B, RHO-1 and the shorter lengths; lane 2: size A and the longest length)
shorter=$(for l in $LENGTHS; do [ "$l" = "$longest" ] || echo "$l"; done)
lane1() {
  train_one "$teacher" "${data[@]}" "${size_b[@]}" selection=clm "trainer.max_steps=$(( 2 * STEPS ))" seed=0
  methods b "${size_b[@]}"; eslm_kd b "${size_b[@]}"; clm_budgets b "${size_b[@]}"; rho1
  # shellcheck disable=SC2086
  lengths $shorter
  downstream "$root/methods/b" "$root/rho1" "$root/lengths"
}
lane2() {
  methods a "${size_a[@]}"; clm_budgets a "${size_a[@]}"; coconts; eslm_kd a "${size_a[@]}"; lengths "$longest"
  keep_sweep
  downstream "$root/methods/a" "$root/lengths/L$longest" "$root/coconts"
}
if [ "$LANES" -gt 1 ]; then
  lane1 > "$root/lane1.log" 2>&1 & p1=$!
  lane2 > "$root/lane2.log" 2>&1 & p2=$!
  echo "lanes running: tail -f $root/lane1.log $root/lane2.log"
  status=0; wait "$p1" || status=$?; wait "$p2" || status=$?
  [ "$status" -eq 0 ] || { echo "reproduce_small.sh: error: a lane failed: see $root/lane*.log" >&2; exit 1; }
else
  lane1; lane2
fi
echo "runs done in $(( ($(date +%s) - start) / 60 )) min"

# each part's `slm report` (ROOT/reports/<part>/) and the page, by the package (slm_cli/report/results.py)
"$python" -m slm_cli.report.results "$root" "$results" --keep "$KEEP" \
  --command "STEPS=$STEPS SEEDS=\"$SEEDS\" scripts/reproduce_small.sh${extra[*]:+ ${extra[*]}}"
echo "results: $results (reports in $root/reports)"
