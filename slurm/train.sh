#!/usr/bin/env bash
# Driver job: ingest -> prepare -> train (classifier + U-Net), with the Dask work on worker jobs.
#
#   SOURCE=/archive/lwir STORE=data/season.zarr sbatch slurm/train.sh jobs/ci.toml
#
# Submit from the repository root (the job runs there and uses its .venv). This job runs the cirrus
# commands and the Dask scheduler; with CLUSTER=slurm (default) ingest and prepare start their Dask workers
# as separate SLURM jobs from [cluster.slurm] of the job config (cirrus cluster-script --config ... prints
# one), and each training runs as a task on a GPU worker. Environment:
#   SOURCE   archive directory, glob or URL to ingest (required)
#   STORE    zarr store (default: data/season.zarr)
#   CLUSTER  slurm (default), local, or tcp://host:port
#   TASK     classify, segment or both (default)
# Near the walltime (USR1) training checkpoints after its epoch and the job is requeued; the requeued job
# resumes training (train --resume) and skips what ingest and prepare already did.
#SBATCH --job-name=cirrus-train
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
JOB=train.sh
# shellcheck source=slurm/common.sh
source "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/common.sh"

CONFIG=${1:-jobs/ci.toml}
: "${SOURCE:?set SOURCE to the archive to ingest, e.g. SOURCE=/archive/lwir sbatch slurm/train.sh $CONFIG}"
STORE=${STORE:-data/season.zarr}
CLUSTER=${CLUSTER:-slurm}
TASK=${TASK:-both}
[[ -f $CONFIG ]] || { echo "$JOB: no job config $CONFIG" >&2; exit 2; }
mkdir -p "$(dirname "$STORE")"

resume=()
[[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]] && resume=(--resume)
echo "$JOB: job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname -s): $CONFIG, $SOURCE -> $STORE" >&2

rc=0
# ingest and prepare stop on SIGINT (committed images are kept); train on USR1 (checkpoint after the epoch)
step INT cirrus ingest "$SOURCE" "$STORE" --config "$CONFIG" --cluster "$CLUSTER" --no-progress \
    && step INT cirrus prepare "$STORE" --config "$CONFIG" --cluster "$CLUSTER" --no-progress \
    && step USR1 cirrus train "$STORE" --task "$TASK" --config "$CONFIG" --cluster "$CLUSTER" --no-progress "${resume[@]}" \
    || rc=$?
finish "$rc"
