#!/usr/bin/env bash
# Print an access token: scripts/login.sh [email] [password]
# On an error, the service's reason goes to stderr and the exit code is not 0.
set -euo pipefail
here="$(dirname "$0")"
url="${MYFLIX_URL:-http://localhost:8000}"
body=$(python3 -c 'import json, sys; print(json.dumps({"email": sys.argv[1], "password": sys.argv[2]}))' \
  "${1:-alice@myflix.dev}" "${2:-alice-wonderland}")
curl -sS -D - -X POST "$url/api/auth/login" -H 'Content-Type: application/json' -d "$body" |
  python3 "$here/http_answer.py" --service "$url" --field access_token
