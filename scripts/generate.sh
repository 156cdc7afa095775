#!/usr/bin/env bash
# Create a job and print its id: TOKEN=... scripts/generate.sh "prompt" [num_images]
# On an error, the service's reason goes to stderr and the exit code is not 0.
set -euo pipefail
here="$(dirname "$0")"
url="${MYFLIX_URL:-http://localhost:8000}"
: "${TOKEN:?set TOKEN, e.g. TOKEN=\$(scripts/login.sh)}"
prompt="${1:?usage: generate.sh PROMPT [NUM_IMAGES]}"
num_images="${2:-4}"
if [[ ! "$num_images" =~ ^[0-9]+$ ]]; then
  echo "usage: generate.sh PROMPT [NUM_IMAGES]: NUM_IMAGES is a number, not '$num_images'" >&2
  exit 2
fi
body=$(python3 -c 'import json, sys; print(json.dumps({"prompt": sys.argv[1], "num_images": int(sys.argv[2])}))' \
  "$prompt" "$num_images")
curl -sS -D - -X POST "$url/api/generate/" \
  -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d "$body" |
  python3 "$here/http_answer.py" --service "$url" --field job_id
