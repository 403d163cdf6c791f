#!/usr/bin/env bash
# Set up and run every test tier this machine supports:
#   1. SQLite + in-memory channel layer: engine, services, sockets, worker, browser;
#   2. the same suite on PostgreSQL + Redis (DATABASE_URL / REDIS_URL), plus the
#      system tier: clusters of real server and worker processes (tests/system).
# With CI=true a missing PostgreSQL, Redis or Chromium is a failure, not a skip.
#
# Tiers 1 and 2 run at the same time, each in a pytest process of its own with
# its own temporary folder, test database and artifacts folder; each one's
# output is printed whole when it ends. Then the system tier runs alone (its
# kill, restart and cancel-within-2-s tests time real processes), and last the
# socket hygiene test, alone too (it measures one busy server). TEST_SERIAL=1,
# or any pytest arguments (they go to tiers 1 and 2), runs everything one after
# the other instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY=.venv/bin/python
ARTIFACTS=${TEST_ARTIFACTS_DIR:-$PWD/test-artifacts}
PG_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
REDIS=${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}
ci=${CI:-}

backends_up() {
  "$PY" - "$PG_URL" "$REDIS" <<'PYEOF'
import sys
import psycopg, redis
try:
    psycopg.connect(sys.argv[1].replace("postgres://", "postgresql://"), connect_timeout=3).close()
    redis.Redis.from_url(sys.argv[2], socket_connect_timeout=3).ping()
except Exception as exc:
    print(f"PostgreSQL/Redis not reachable: {exc}", file=sys.stderr)
    sys.exit(1)
PYEOF
}

tier2=yes
if ! backends_up; then
  if [ "$ci" = "true" ] || [ "$ci" = "1" ]; then
    echo "FAIL: CI=true and PostgreSQL/Redis are not reachable ($PG_URL, $REDIS)." >&2
    exit 1
  fi
  echo "SKIPPED tier 2: PostgreSQL/Redis not reachable (set TEST_DATABASE_URL / TEST_REDIS_URL)."
  tier2=
fi

# lane NAME ARGS...: pytest in a temporary folder and an artifacts folder of the lane's own.
lane() {
  local name=$1
  shift
  CMBAGENT_VAR_DIR=$(mktemp -d) TEST_ARTIFACTS_DIR="$ARTIFACTS/$name" "$PY" -m pytest -q "$@"
}
tier1() { (unset DATABASE_URL REDIS_URL; lane tier1 --ignore=tests/system "$@"); }
# The engine uses neither database nor channel layer (tests/engine checks it does not even import
# Django): its tests run in tier 1 only.
tier2() { (export DATABASE_URL="$PG_URL" REDIS_URL="$REDIS"; lane tier2 --ignore=tests/system --ignore=tests/engine "$@"); }
# The system tier makes databases of its own from DATABASE_URL; its pytest process needs no test database.
# The socket hygiene test measures one server's tasks and memory over 10,000 sockets: it runs alone.
HYGIENE=tests/system/test_socket_hygiene.py
system() { (export DATABASE_URL="$PG_URL" REDIS_URL="$REDIS"; lane system tests/system --ignore=$HYGIENE); }
hygiene() { (export DATABASE_URL="$PG_URL" REDIS_URL="$REDIS"; lane hygiene $HYGIENE); }

if [ -n "${TEST_SERIAL:-}" ] || [ $# -gt 0 ]; then
  echo "==> Tier 1: SQLite + in-memory channel layer"
  # The system tier (real server and worker processes) needs PostgreSQL + Redis: tier 2 runs it.
  tier1 "$@"
  if [ -n "$tier2" ]; then
    echo "==> Tier 2: PostgreSQL + Redis"
    tier2 "$@"
    [ $# -gt 0 ] || { system; hygiene; }
  fi
  exit 0
fi

logs=$(mktemp -d)
declare -A pids
started=$SECONDS
echo "==> Tier 1 (SQLite + in-memory channel layer)${tier2:+ and tier 2 (PostgreSQL + Redis)}, at the same time"
tier1 >"$logs/tier1.log" 2>&1 & pids[tier1]=$!
if [ -n "$tier2" ]; then
  tier2 >"$logs/tier2.log" 2>&1 & pids[tier2]=$!
fi
failed=()
for name in tier1 tier2; do
  [ -n "${pids[$name]:-}" ] || continue
  if wait "${pids[$name]}"; then status=passed; else status=FAILED; failed+=("$name"); fi
  echo
  echo "==> $name: $status (done $((SECONDS - started)) s after the start)"
  cat "$logs/$name.log"
done
rm -rf "$logs"
if [ -n "$tier2" ]; then
  echo
  echo "==> The system tier, alone"
  if ! system; then failed+=(system); fi
  echo
  echo "==> The socket hygiene test, alone"
  if ! hygiene; then failed+=(hygiene); fi
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED lanes: ${failed[*]}" >&2
  exit 1
fi
echo "==> All lanes passed in $((SECONDS - started)) s"
