#!/usr/bin/env bash
# Build the CPU image, start the compose CPU service, and check it for real: /health answers 200 and one chat
# completion (with rerank) comes back. Stops the service afterwards. Usage: bash docker/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_BUILD:-0}" = 1 ] || bash docker/build.sh
export ARBITER_PORT=${ARBITER_PORT:-18000}
COMPOSE="docker-compose -p arbiter-smoke"
trap '$COMPOSE down -v > /dev/null 2>&1 || true' EXIT
$COMPOSE up -d arbiter
URL="http://127.0.0.1:$ARBITER_PORT"
for i in $(seq 1 120); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$URL/health" || true)
    [ "$code" = 200 ] && break
    sleep 2
done
echo "health: $code after ~$((i * 2)) s"
[ "$code" = 200 ] || { $COMPOSE logs --tail 50 arbiter; exit 1; }
curl -fsS "$URL/health"; echo
model=$(curl -fsS "$URL/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
curl -fsS "$URL/v1/chat/completions" -H 'Content-Type: application/json' -d "{\"model\": \"$model\",
  \"messages\": [{\"role\": \"user\", \"content\": \"Give me one tip for sleeping well.\"}], \"max_tokens\": 32,
  \"seed\": 1, \"rerank\": {\"candidates\": 4}}" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("completion:", repr(r["choices"][0]["message"]["content"]), "| rerank:", {k: v for k, v in r["rerank"].items() if k != "candidates"})
assert r["choices"][0]["message"]["content"]'
# Docker's own health status for the container, from the image's HEALTHCHECK.
for i in $(seq 1 30); do
    st=$(docker inspect -f '{{.State.Health.Status}}' "$($COMPOSE ps -q arbiter)")
    [ "$st" = healthy ] && break
    sleep 2
done
echo "docker health status: $st"
[ "$st" = healthy ]
echo "docker smoke test passed"
