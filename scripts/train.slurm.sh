#!/usr/bin/env bash
# Multi-node training on Slurm: one torchrun per node, torchrun starts one rank per GPU.
#   sbatch --nodes=2 scripts/train.slurm.sh --config configs/qwen3vl-2b-ko-doc.yaml [overrides]
# Shards and the output directory must be on a filesystem every node sees at the same path.
# A requeued job resumes from the newest committed checkpoint (--resume auto); SIGTERM sent by
# Slurm before the time limit makes every rank checkpoint and exit 0.
#SBATCH --job-name=qwen3vl-mdlm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
# Read every host name (no `| head`: under pipefail, scontrol killed by SIGPIPE would end the job).
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR="${HOSTS[0]}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-python}"
RESUME=()
if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then RESUME=(--resume auto); fi
# Slurm sends SIGTERM 300 s before the time limit (--signal=TERM@300 above); torchrun forwards it to
# the ranks and, by default, SIGKILLs them 30 s later. Give the ranks the grace time asked of Slurm
# (less a margin) to finish their step and commit a checkpoint. (scancel waits Slurm's KillWait.)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${GRACE_S:-280}"

# `exec` in each task so that Slurm's SIGTERM reaches torchrun, which forwards it to the ranks.
srun --kill-on-bad-exit=1 bash -c "exec $PYTHON -m torch.distributed.run \
    --nnodes=$SLURM_NNODES --node_rank=\$SLURM_NODEID --nproc_per_node=$GPUS_PER_NODE \
    --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv_id=$SLURM_JOB_ID \
    -m trainer train $* ${RESUME[*]:-}"
