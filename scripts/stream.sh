#!/usr/bin/env bash
# Follow a job's Server-Sent Events: TOKEN=... scripts/stream.sh JOB_ID [LAST_EVENT_ID]
# On an error, the service's reason goes to stderr and the exit code is not 0. A finished
# job resumed at or past its last event has nothing more to send: no output, exit 0.
set -euo pipefail
here="$(dirname "$0")"
url="${MYFLIX_URL:-http://localhost:8000}"
: "${TOKEN:?set TOKEN, e.g. TOKEN=\$(scripts/login.sh)}"
job_id="${1:?usage: stream.sh JOB_ID [LAST_EVENT_ID]}"
curl -sS -N -D - "$url/api/generate/$job_id/stream" \
  -H "Authorization: Bearer $TOKEN" ${2:+-H "Last-Event-ID: $2"} |
  python3 "$here/http_answer.py" --service "$url" --stream
