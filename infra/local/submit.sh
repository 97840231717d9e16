# Sourced by main-job.sh, bench/reproduce_mini.py and the local-stack test: `submit <entrypoint…>` runs
# `ray job submit -- <entrypoint…>` on the cluster in RAY_ADDRESS and fails unless the job SUCCEEDED.
#
# `ray job submit` exits non-zero only for a FAILED job: a job that was stopped (`ray job stop`, the
# dashboard's button) exits 0 too. Each job gets an id and its final status is read back, so a
# chain of jobs never goes on from a step that did not finish.
submit() {
    local id status
    id="kosmos-g-$(date +%Y%m%d-%H%M%S)-$RANDOM"
    ray job submit --submission-id "$id" -- "$@" || true  # a FAILED job's status is read below
    status=$(python -c 'import sys; from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient().get_job_status(sys.argv[1]).value)' "$id")
    if [[ "$status" != SUCCEEDED ]]; then
        echo "submit: job $id ($*) ended $status" >&2
        return 1
    fi
}
