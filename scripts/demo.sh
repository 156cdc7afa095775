#!/usr/bin/env bash
# Log in, create a job, follow it to the end: scripts/demo.sh ["prompt"] [num_images]
# Each step says why on stderr and stops the demo with a non-zero exit code if it fails.
set -euo pipefail
here="$(dirname "$0")"
TOKEN="$("$here/login.sh")"
export TOKEN
job_id="$("$here/generate.sh" "${1:-A beautiful sunset}" "${2:-4}")"
echo "job $job_id" >&2
"$here/stream.sh" "$job_id"
