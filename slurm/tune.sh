#!/usr/bin/env bash
# Driver job: an Optuna study whose trials run on Dask GPU worker jobs, recorded in MLflow; the best
# configuration is retrained and registered at the end.
#
#   STORE=data/season.zarr TRIALS=40 sbatch slurm/tune.sh jobs/tune.toml
#
# Submit from the repository root, on a store that is already ingested and prepared (slurm/train.sh).
# Environment:
#   STORE    prepared zarr store (default: data/season.zarr)
#   TASK     segment (default) or classify
#   TRIALS   finished trials wanted in the study, counting those of earlier runs (default 20)
#   CLUSTER  slurm (default), local, or tcp://host:port
# The study lives in the storage of [tune] (a database or journal file on the shared filesystem): a
# requeued job (USR1 near the walltime) continues the same study.
#SBATCH --job-name=cirrus-tune
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
JOB=tune.sh
# shellcheck source=slurm/common.sh
source "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/common.sh"

CONFIG=${1:-jobs/tune.toml}
STORE=${STORE:-data/season.zarr}
TASK=${TASK:-segment}
TRIALS=${TRIALS:-20}
CLUSTER=${CLUSTER:-slurm}
[[ -f $CONFIG ]] || { echo "$JOB: no job config $CONFIG" >&2; exit 2; }
echo "$JOB: job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname -s): $CONFIG, $STORE, $TASK x $TRIALS" >&2

rc=0
step INT cirrus tune "$STORE" --task "$TASK" --trials "$TRIALS" --config "$CONFIG" --cluster "$CLUSTER" --no-progress \
    || rc=$?
finish "$rc"
