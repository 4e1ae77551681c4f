#!/usr/bin/env bash
# Driver job: ingest -> prepare -> train (classifier + U-Net), with the Dask work on worker jobs.
#
#   mkdir -p slurm/logs
#   SOURCE=/archive/lwir STORE=data/season.zarr sbatch slurm/train.sh jobs/ci.toml
#
# Submit from the repository root (the job runs there and uses its .venv). This job runs the three
# cirrus commands; with CLUSTER=slurm (default) ingest and prepare start their Dask workers as separate
# SLURM jobs from [cluster.slurm] of the job config (cirrus cluster-script --config ... prints one),
# and training runs in this job. Environment:
#   SOURCE   archive directory, glob or URL to ingest (required)
#   STORE    zarr store (default: data/season.zarr)
#   CLUSTER  slurm (default), local, or tcp://host:port
#   TASK     classify, segment or both (default)
#
# Near the walltime SLURM sends USR1 (--signal=B:USR1@120) to this script: it stops the running step
# cleanly (training writes its checkpoint after the current epoch; ingest and prepare keep every
# committed image) and requeues the job, which then continues where it stopped (train --resume).
#SBATCH --job-name=cirrus-train
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
set -euo pipefail

CONFIG=${1:-jobs/ci.toml}
cd "${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
: "${SOURCE:?set SOURCE to the archive to ingest, e.g. SOURCE=/archive/lwir sbatch slurm/train.sh $CONFIG}"
STORE=${STORE:-data/season.zarr}
CLUSTER=${CLUSTER:-slurm}
TASK=${TASK:-both}
[[ -f $CONFIG ]] || { echo "train.sh: no job config $CONFIG" >&2; exit 2; }
[[ -x .venv/bin/cirrus ]] || { echo "train.sh: no .venv in $(pwd) (make install)" >&2; exit 2; }
# shellcheck disable=SC1091
source .venv/bin/activate
mkdir -p slurm/logs "$(dirname "$STORE")"

child="" stop_signal=INT stopped=""
on_usr1() {  # near the walltime: stop the running step cleanly, then requeue (below)
    stopped=1
    echo "train.sh: USR1 (walltime near): sending SIG$stop_signal to ${child:-nothing}" >&2
    [[ -n $child ]] && kill -s "$stop_signal" "$child" 2>/dev/null || true
}
trap on_usr1 USR1

step() {  # step SIGNAL CMD...: run CMD in the background so the trap can fire; SIGNAL stops it cleanly
    stop_signal=$1
    shift
    [[ -z $stopped ]] || return 1
    echo "train.sh: $(date +%T) $*" >&2
    "$@" &
    child=$!
    local rc
    while :; do
        wait "$child" && rc=0 || rc=$?
        kill -0 "$child" 2>/dev/null || break  # else wait was interrupted by the trapped USR1
    done
    child=""
    return "$rc"
}

resume=()
[[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]] && resume=(--resume)
echo "train.sh: job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname -s): $CONFIG, $SOURCE -> $STORE" >&2

rc=0
# ingest and prepare stop on SIGINT (KeyboardInterrupt: committed images are kept); train on USR1 (checkpoint)
step INT cirrus ingest "$SOURCE" "$STORE" --config "$CONFIG" --cluster "$CLUSTER" --no-progress \
    && step INT cirrus prepare "$STORE" --config "$CONFIG" --cluster "$CLUSTER" --no-progress \
    && step USR1 cirrus train "$STORE" --task "$TASK" --config "$CONFIG" --no-progress "${resume[@]}" \
    || rc=$?

if [[ -n $stopped && -n ${SLURM_JOB_ID:-} ]]; then
    echo "train.sh: stopped near the walltime (exit $rc); requeueing job $SLURM_JOB_ID to continue" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "train.sh: $(date +%T) done (exit $rc)" >&2
exit "$rc"
