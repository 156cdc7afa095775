#!/usr/bin/env bash
# Print an access token: scripts/login.sh [email] [password]
set -euo pipefail
url="${MYFLIX_URL:-http://localhost:8000}"
body=$(python3 -c 'import json, sys; print(json.dumps({"email": sys.argv[1], "password": sys.argv[2]}))' \
  "${1:-alice@myflix.dev}" "${2:-alice-wonderland}")
curl -sS --fail-with-body -X POST "$url/api/auth/login" -H 'Content-Type: application/json' -d "$body" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])'
