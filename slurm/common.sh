# Sourced by the cirrus driver jobs (train.sh, reprocess.sh, tune.sh): working directory, venv, and the
# walltime signal. Near the walltime SLURM sends USR1 (--signal=B:USR1@120) to the batch script: the running
# step is stopped cleanly with its own signal (training checkpoints after the current epoch; ingest, prepare,
# reprocess and tune keep everything committed) and `finish` requeues the job, which then continues.
# shellcheck shell=bash
set -euo pipefail

JOB=${JOB:-cirrus}
cd "${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
[[ -x .venv/bin/cirrus ]] || { echo "$JOB: no .venv in $(pwd) (run make install there)" >&2; exit 2; }
# shellcheck disable=SC1091
source .venv/bin/activate
mkdir -p slurm/logs

child="" stop_signal=INT stopped=""
on_usr1() {
    stopped=1
    echo "$JOB: USR1 (walltime near): sending SIG$stop_signal to ${child:-nothing}" >&2
    [[ -n $child ]] && kill -s "$stop_signal" "$child" 2>/dev/null || true
}
trap on_usr1 USR1

step() {  # step SIGNAL CMD...: run CMD in the background so the trap can fire; SIGNAL stops it cleanly
    stop_signal=$1
    shift
    [[ -z $stopped ]] || return 1
    echo "$JOB: $(date +%T) $*" >&2
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

finish() {  # finish RC: requeue when stopped near the walltime, else exit with RC
    if [[ -n $stopped && -n ${SLURM_JOB_ID:-} ]]; then
        echo "$JOB: stopped near the walltime (exit $1); requeueing job $SLURM_JOB_ID to continue" >&2
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "$JOB: $(date +%T) done (exit $1)" >&2
    exit "$1"
}
