#!/usr/bin/env bash
# Follow a job's Server-Sent Events: TOKEN=... scripts/stream.sh JOB_ID [LAST_EVENT_ID]
set -euo pipefail
url="${MYFLIX_URL:-http://localhost:8000}"
: "${TOKEN:?set TOKEN, e.g. TOKEN=\$(scripts/login.sh)}"
job_id="${1:?usage: stream.sh JOB_ID [LAST_EVENT_ID]}"
curl -sS -N --fail-with-body "$url/api/generate/$job_id/stream" \
  -H "Authorization: Bearer $TOKEN" ${2:+-H "Last-Event-ID: $2"}
