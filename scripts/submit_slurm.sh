#!/bin/bash
# Multi-node `slm train` with plain sbatch + srun, for clusters where you do not use
# `hydra/launcher=slurm` (docs/scaling.md). Copy it, edit the #SBATCH lines, then submit from the
# repository root:
#
#   sbatch scripts/submit_slurm.sh model=gpt2 data=openwebtext trainer.max_steps=600000
#
# Every argument is a Hydra override for `slm train`. Command-line sbatch options override the lines
# below (e.g. `sbatch --nodes=4 --time=2-00:00:00 scripts/submit_slurm.sh ...`).
#
# One task per GPU: --ntasks-per-node must equal --gpus-per-node; the script passes
# trainer.num_nodes=$SLURM_NNODES and trainer.devices=$SLURM_NTASKS_PER_NODE, so Lightning and
# SLURM always agree (a mismatch hangs Lightning).
#
# Requeue: this batch script is the only owner. SLURM sends USR1 to the batch shell (B:) 120 s
# before the time limit; the trap below passes it on to the tasks through srun, each `slm train`
# saves checkpoints/last.ckpt at the end of the step in progress and exits (slm_cli/preemption.py),
# and then the script runs `scontrol requeue`: SLURM starts it again under the same job id. The run
# dir is fixed per job id, so the restarted `slm train` resumes from the step it had reached.
# Keep the 120 s above one training step plus one checkpoint save: a run still busy at the time
# limit is killed and not requeued. On SIGTERM (scontrol requeue, preemption, scancel) slm saves
# the same way before it exits. Lightning never requeues (slm uses
# SLURMEnvironment(auto_requeue=False)). The job is requeued until it finishes or you `scancel` it.
#
# Environment (export before sbatch; sbatch passes the environment on):
#   SLM_TRAINER   trainer config group (default ddp; fsdp for sharded training, cpu for a CPU test)
#   SLM_RUN_DIR   run dir (default outputs/train/slurm-<job id>); set it to continue another job's run
#   SLM           the slm command (default .venv/bin/slm, relative to the submission directory)
#
#SBATCH --job-name=slm-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4          # = GPUs per node = trainer.devices
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8            # CPU threads per GPU process (data loading, the CPU side of a step)
#SBATCH --mem=0                      # 0: all of each node's memory
#SBATCH --time=24:00:00
#SBATCH --requeue                    # may be requeued (by the trap below, or by SLURM after a node failure)
#SBATCH --signal=B:USR1@120          # USR1 to this script 120 s before --time runs out
#SBATCH --open-mode=append           # a requeued job appends to the same log
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=myproject
##SBATCH --qos=normal

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

SLM=${SLM:-.venv/bin/slm}
TRAINER=${SLM_TRAINER:-ddp}
RUN_DIR=${SLM_RUN_DIR:-outputs/train/slurm-${SLURM_JOB_ID:?run this script with sbatch}}
NNODES=${SLURM_NNODES:-1}
NTASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
# As many CPU threads per process as CPUs per task (PyTorch would start one per core of the node).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

echo "slm: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
     "${NNODES} node(s) x ${NTASKS_PER_NODE} task(s), trainer=${TRAINER}, run dir ${RUN_DIR}"

requeue_wanted=0
# shellcheck disable=SC2317  # (run by the trap)
time_limit_near() {
    echo "slm: time limit near: job ${SLURM_JOB_ID} saves the step it is at, then is requeued"
    requeue_wanted=1
    kill -USR1 "$srun_pid" 2>/dev/null || true   # srun passes the signal on to every task
}
trap time_limit_near USR1

# srun in the background: bash runs a trap only between commands, and `wait` returns at once when
# the signal arrives.
srun --kill-on-bad-exit=1 "$SLM" train "trainer=${TRAINER}" "trainer.num_nodes=${NNODES}" \
    "trainer.devices=${NTASKS_PER_NODE}" "hydra.run.dir=${RUN_DIR}" "$@" &
srun_pid=$!
status=0
while :; do
    wait "$srun_pid" && status=0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break   # srun has ended (not just a trapped signal)
done
# After the warning, a run that did not finish (it stopped at its checkpoint: exit 128 + 10) goes
# back to the queue and resumes from ${RUN_DIR}/checkpoints/last.ckpt.
if [[ $requeue_wanted == 1 && $status != 0 ]]; then
    echo "slm: requeueing job ${SLURM_JOB_ID} (slm exited with ${status}); it resumes from ${RUN_DIR}/checkpoints/last.ckpt"
    scontrol requeue "${SLURM_JOB_ID}" || echo "slm: scontrol requeue ${SLURM_JOB_ID} failed" >&2
fi
exit "$status"
