#!/usr/bin/env bash
# Sweep selection strategies x keep ratios x seeds: one `slm train -m` (Hydra multirun) per strategy.
#
#   scripts/sweep_ratios.sh [-s STRATEGIES] [-r RATIOS] [-n SEEDS] [-o SWEEP_ROOT] [--] [slm train overrides...]
#
#   -s  strategies (default "clm random eslm"): clm random eslm ada_eslm rho1
#   -r  keep ratios, the share of tokens trained on (default "0.3 0.5 0.7"). random and rho1 take it
#       as selection.ratio; eslm as selection.alpha = 1 - ratio (it keeps the tokens above the
#       alpha-quantile). clm trains on everything and ada_eslm adapts its own ratio: each runs once
#       per seed.
#   -n  seeds (default "1")
#   -o  sweep root (default outputs/sweep_ratios/<date>_<time>): <root>/<strategy>/<job>/ per run,
#       each with its summary.json; Hydra writes <root>/<strategy>/multirun.yaml
#
# Everything else goes to `slm train` unchanged, e.g. an experiment, a data set, or a launcher:
#   scripts/sweep_ratios.sh -s "random eslm" -r "0.4 0.6" -n "1 2" +experiment=eslm_tiny
#   scripts/sweep_ratios.sh -r "0.6" hydra/launcher=slurm hydra.launcher.partition=gpu trainer=ddp
# Set SLM to the command to run (default: slm; e.g. SLM=".venv/bin/slm").
set -euo pipefail

strategies="clm random eslm"
ratios="0.3 0.5 0.7"
seeds="1"
root="outputs/sweep_ratios/$(date +%Y-%m-%d_%H-%M-%S)"
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
while getopts "s:r:n:o:h" opt; do
  case "$opt" in
    s) strategies="$OPTARG" ;;
    r) ratios="$OPTARG" ;;
    n) seeds="$OPTARG" ;;
    o) root="$OPTARG" ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift

join() { local IFS=,; echo "$*"; }
# shellcheck disable=SC2086  # word splitting of the space-separated lists is intended
{
  seed_list=$(join $seeds)
  for r in $ratios; do
    awk -v r="$r" 'BEGIN { exit !(r + 0 > 0 && r + 0 < 1) }' \
      || { echo "sweep_ratios.sh: error: ratio $r must be in (0, 1): e.g. -r \"0.3 0.5\"" >&2; exit 2; }
  done
  ratio_list=$(join $ratios)
  for s in $strategies; do
    case "$s" in clm|random|eslm|ada_eslm|rho1) ;; *)
      echo "sweep_ratios.sh: error: unknown strategy '$s': use clm, random, eslm, ada_eslm or rho1" >&2; exit 2 ;;
    esac
  done
  alpha_list=$(join $(for r in $ratios; do awk -v r="$r" 'BEGIN { printf "%.6g\n", 1 - r }'; done))
}

read -r -a cmd <<< "${SLM:-slm}"
for s in $strategies; do
  case "$s" in
    clm|ada_eslm) sweep=("seed=$seed_list") ;;
    random|rho1) sweep=("selection.ratio=$ratio_list" "seed=$seed_list") ;;
    eslm) sweep=("selection.alpha=$alpha_list" "seed=$seed_list") ;;
  esac
  echo "== $s: ${sweep[*]}"
  "${cmd[@]}" train -m "selection=$s" "${sweep[@]}" "hydra.sweep.dir=$root/$s" "$@"
done
echo "sweep done: $root"
