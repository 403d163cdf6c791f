#!/usr/bin/env bash
# Set up and run every test tier this machine supports:
#   1. SQLite + in-memory channel layer: engine, services, sockets, worker, browser;
#   2. the same suite on PostgreSQL + Redis (DATABASE_URL / REDIS_URL), plus the
#      system tier: clusters of real server and worker processes (tests/system).
# With CI=true a missing PostgreSQL, Redis or Chromium is a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY=.venv/bin/python
export CMBAGENT_VAR_DIR=${CMBAGENT_VAR_DIR:-$(mktemp -d)}
export TEST_ARTIFACTS_DIR=${TEST_ARTIFACTS_DIR:-$PWD/test-artifacts}
PG_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
REDIS=${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}
ci=${CI:-}

echo "==> Tier 1: SQLite + in-memory channel layer"
# The system tier (real server and worker processes) needs PostgreSQL + Redis: tier 2 runs it.
env -u DATABASE_URL -u REDIS_URL "$PY" -m pytest -q --ignore=tests/system "$@"

echo "==> Tier 2: PostgreSQL + Redis"
if "$PY" - "$PG_URL" "$REDIS" <<'PYEOF'
import sys
import psycopg, redis
try:
    psycopg.connect(sys.argv[1].replace("postgres://", "postgresql://"), connect_timeout=3).close()
    redis.Redis.from_url(sys.argv[2], socket_connect_timeout=3).ping()
except Exception as exc:
    print(f"PostgreSQL/Redis not reachable: {exc}", file=sys.stderr)
    sys.exit(1)
PYEOF
then
  DATABASE_URL="$PG_URL" REDIS_URL="$REDIS" "$PY" -m pytest -q "$@"
elif [ "$ci" = "true" ] || [ "$ci" = "1" ]; then
  echo "FAIL: CI=true and PostgreSQL/Redis are not reachable ($PG_URL, $REDIS)." >&2
  exit 1
else
  echo "SKIPPED tier 2: PostgreSQL/Redis not reachable (set TEST_DATABASE_URL / TEST_REDIS_URL)."
fi
