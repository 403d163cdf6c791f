#!/usr/bin/env bash
# Create .venv (if missing or older than pyproject.toml) and install the pinned dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "Python 3.11 is required (found: $("$PYTHON" --version 2>&1)). Set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
echo "==> Creating the virtual environment in .venv"
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
echo "==> Installing pinned dependencies"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
touch "$stamp"
