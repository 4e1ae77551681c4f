#!/usr/bin/env bash
# Driver job: reprocess a season archive with the registered models: ingest new files -> prepare ->
# reprocess (classifier + U-Net on every image, on GPU worker jobs) -> season report (logged to MLflow).
#
#   SOURCE=/archive/lwir/2026 STORE=data/season-2026.zarr sbatch slurm/reprocess.sh jobs/ci.toml
#
# Submit from the repository root. Environment:
#   SOURCE   archive to ingest first (optional: without it the store is reprocessed as it is)
#   STORE    zarr store (default: data/season.zarr)
#   CLUSTER  slurm (default), local, or tcp://host:port
#   REPORT   report directory (default: STORE without .zarr, plus -report)
#   MODELS   extra reprocess options, e.g. "--classifier models:/cirrus-classifier/3 --unet models:/cirrus-unet/5"
# Every step resumes where it stopped: a requeued job (USR1 near the walltime) skips finished shards.
#SBATCH --job-name=cirrus-reprocess
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
JOB=reprocess.sh
# shellcheck source=slurm/common.sh
source "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/common.sh"

CONFIG=${1:-jobs/ci.toml}
STORE=${STORE:-data/season.zarr}
CLUSTER=${CLUSTER:-slurm}
REPORT=${REPORT:-${STORE%.zarr}-report}
read -r -a models <<< "${MODELS:-}"
[[ -f $CONFIG ]] || { echo "$JOB: no job config $CONFIG" >&2; exit 2; }
echo "$JOB: job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname -s): $CONFIG, ${SOURCE:-(no ingest)} -> $STORE" >&2

rc=0
if [[ -n ${SOURCE:-} ]]; then
    step INT cirrus ingest "$SOURCE" "$STORE" --config "$CONFIG" --cluster "$CLUSTER" --no-progress || rc=$?
fi
[[ $rc -eq 0 ]] \
    && step INT cirrus prepare "$STORE" --config "$CONFIG" --cluster "$CLUSTER" --no-progress \
    && step INT cirrus reprocess "$STORE" --config "$CONFIG" --cluster "$CLUSTER" --no-progress "${models[@]}" \
    && step INT cirrus report "$STORE" --config "$CONFIG" --out "$REPORT" \
    || rc=$?
finish "$rc"
