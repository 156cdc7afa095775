#!/usr/bin/env bash
# Create a job and print its id: TOKEN=... scripts/generate.sh "prompt" [num_images]
set -euo pipefail
url="${MYFLIX_URL:-http://localhost:8000}"
: "${TOKEN:?set TOKEN, e.g. TOKEN=\$(scripts/login.sh)}"
prompt="${1:?usage: generate.sh PROMPT [NUM_IMAGES]}"
body=$(python3 -c 'import json, sys; print(json.dumps({"prompt": sys.argv[1], "num_images": int(sys.argv[2])}))' "$prompt" "${2:-4}")
curl -sS --fail-with-body -X POST "$url/api/generate/" \
  -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d "$body" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["job_id"])'
