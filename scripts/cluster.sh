#!/usr/bin/env bash
# A local cluster: two Daphne servers and two run workers sharing PostgreSQL and
# Redis. Any server shows any session live, whichever worker runs it.
#   DATABASE_URL (default postgres://postgres@127.0.0.1:5432/cmbagent)
#   REDIS_URL    (default redis://127.0.0.1:6379/0)
#   SERVERS / WORKERS (default 2 / 2), BASE_PORT (default 8001)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/cmbagent}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
export EMBEDDED_WORKER=0
SERVERS=${SERVERS:-2}
WORKERS=${WORKERS:-2}
BASE_PORT=${BASE_PORT:-8001}
PY=.venv/bin/python

db_name=${DATABASE_URL##*/}
db_admin=${DATABASE_URL%/*}/postgres
if ! "$PY" -c "import psycopg, sys; psycopg.connect(sys.argv[1], connect_timeout=3).close()" "$DATABASE_URL" 2>/dev/null; then
  echo "==> Creating database $db_name"
  "$PY" -c "
import psycopg, sys
with psycopg.connect(sys.argv[1], autocommit=True, connect_timeout=3) as c:
    c.execute('CREATE DATABASE \"%s\"' % sys.argv[2])" "$db_admin" "$db_name"
fi
echo "==> Migrating $DATABASE_URL"
"$PY" manage.py migrate --no-input -v0
"$PY" manage.py ensure_admin --base-url "http://127.0.0.1:$BASE_PORT"

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop EXIT INT TERM
for i in $(seq 0 $((SERVERS - 1))); do
  "$PY" manage.py serve --no-worker --port $((BASE_PORT + i)) &
  pids+=($!)
done
for i in $(seq 1 "$WORKERS"); do
  "$PY" manage.py runworker orchestrator &
  pids+=($!)
done
echo "==> $SERVERS servers from http://127.0.0.1:$BASE_PORT/ and $WORKERS workers; Ctrl-C stops them all."
wait
