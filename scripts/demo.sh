#!/usr/bin/env bash
# Log in, create a job, follow it to the end: scripts/demo.sh ["prompt"] [num_images]
set -euo pipefail
here="$(dirname "$0")"
TOKEN="$("$here/login.sh")"
export TOKEN
job_id="$("$here/generate.sh" "${1:-A beautiful sunset}" "${2:-4}")"
echo "job $job_id" >&2
"$here/stream.sh" "$job_id"
