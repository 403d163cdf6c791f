#!/usr/bin/env bash
# Set up and serve the app on the embedded default: SQLite (WAL), in-memory
# channel layer, the run worker inside the Daphne process, the offline model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
echo "==> Migrating the database"
.venv/bin/python manage.py migrate --no-input -v0
echo "==> Admin account"
.venv/bin/python manage.py ensure_admin --base-url "http://$HOST:$PORT"
echo "==> Open http://$HOST:$PORT/ and log in as 'admin' (password above, or the one-time link)."
exec .venv/bin/python manage.py serve --host "$HOST" --port "$PORT"
