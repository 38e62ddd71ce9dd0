#!/usr/bin/env bash
# The papers' claims at small scale, measured: every run, its reports, and docs/results.md.
#
#   scripts/reproduce_small.sh [-o ROOT] [-r RESULTS] [--] [overrides for every training run...]
#
# Four parts, each reported by `slm report` (tables, "against CLM", plots) under ROOT/reports/:
#   methods  CLM, random, ESLM (loss and entropy), Ada-ESLM and ESLM-KD at two model sizes (SIZE_A,
#            SIZE_B), SEEDS seeds each; CLM also at CLM_FRACTIONS of the steps, so that every method
#            meets CLM at the same nominal and realised FLOPs; a keep sweep (KEEPS) of random, ESLM
#            and ESLM-entropy at SIZE_A with SWEEP_SEEDS. The ESLM-KD teacher is SIZE_B trained
#            for twice the steps.
#   rho1     RHO-1 on a noisy mixture: clean WikiText-2 + the same text with its words shuffled +
#            Tiny Shakespeare; the reference trains on clean WikiText-2 test text; CLM, random and
#            RHO-1 at RATIO, evaluated on held-out clean text (val/wiki/loss). These corpora are the
#            vendored ones whatever DATA says; sizes, steps, batch and overrides apply.
#   coconts  CoCoNTs (n-gram soft targets) against CLM at SIZE_A: steps to CLM's loss.
# Then `python -m slm_cli.report.results` writes the reports and RESULTS (default docs/results.md).
#
# Settings (environment variables; the defaults fit a 2-core CPU in about 70 minutes):
#   STEPS=200  SEEDS="1 2 3"  SWEEP_SEEDS="1"  KEEPS="0.2 0.4 0.8"  KEEP=0.6  RATIO=0.6
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
usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }
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

# train DIR OVERRIDES...: one Hydra multirun into DIR (skipped when every job of it has a summary)
train() {
  local dir=$1; shift
  local jobs=0 done_=0
  if [ -f "$dir/multirun.yaml" ]; then
    jobs=$(find "$dir" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9]+' | wc -l)
    done_=$(find "$dir" -mindepth 2 -maxdepth 2 -regex '.*/[0-9]+/summary.json' | wc -l)
  fi
  if [ "$jobs" -gt 0 ] && [ "$jobs" -eq "$done_" ]; then
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
alpha=$(minus "$KEEP")
teacher="$root/methods/teacher"

methods() {  # methods SIZE_NAME SIZE_OVERRIDES...: the six methods at one size, SEEDS seeds each
  local name=$1; shift
  set -- "${data[@]}" "$@"
  local dir="$root/methods/$name"
  train "$dir/clm" "$@" selection=clm "seed=$seeds"
  train "$dir/random" "$@" selection=random "selection.ratio=$KEEP" "seed=$seeds"
  train "$dir/eslm" "$@" selection=eslm "selection.alpha=$alpha" "seed=$seeds"
  train "$dir/eslm_entropy" "$@" selection=eslm selection.score=entropy "selection.alpha=$alpha" "seed=$seeds"
  train "$dir/ada_eslm" "$@" selection=ada_eslm "seed=$seeds"
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
  common_mix=("${mix[@]}" "${size_a[@]}" "seed=$seeds")
  train "$dir/clm" "${common_mix[@]}" selection=clm
  train "$dir/random" "${common_mix[@]}" selection=random "selection.ratio=$RATIO"
  train "$dir/rho1" "${common_mix[@]}" selection=rho1 "selection.ratio=$RATIO"
}
coconts() {  # CoCoNTs against SIZE_A's CLM runs
  OMP_NUM_THREADS=$threads "${slm[@]}" ngram "${data[@]}" "${paths[@]}" ngram.n=4 ngram.r=8
  train "$root/coconts/coconts" "${data[@]}" "${size_a[@]}" selection=clm target=coconts target.n=4 target.r=8 "seed=$seeds"
}

echo "reproduce_small: $root (STEPS=$STEPS SEEDS=\"$SEEDS\" LANES=$LANES, $threads threads each)"
start=$(date +%s)
OMP_NUM_THREADS=$(nproc) "${slm[@]}" prepare "${data[@]}" "${paths[@]}"
# two lanes of about equal length: the teacher comes first in lane 1, ESLM-KD last in lane 2
lane1() {
  train_one "$teacher" "${data[@]}" "${size_b[@]}" selection=clm "trainer.max_steps=$(( 2 * STEPS ))" seed=0
  methods b "${size_b[@]}"; eslm_kd b "${size_b[@]}"; clm_budgets b "${size_b[@]}"
}
lane2() {
  methods a "${size_a[@]}"; clm_budgets a "${size_a[@]}"; keep_sweep; rho1; coconts; eslm_kd a "${size_a[@]}"
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
