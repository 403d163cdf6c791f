# The two commands of the README: `make run` and `make test`.
.PHONY: run test test-fast bench venv clean

venv:
	@bash scripts/bootstrap.sh

run:
	@bash scripts/run.sh

test:
	@bash scripts/test.sh

# The default tier only (SQLite, in-memory layer, browser if Chromium is there).
test-fast: venv
	@.venv/bin/python -m pytest -q -m "not browser"

bench: venv
	@.venv/bin/python bench/engine_overhead.py
	@.venv/bin/python bench/push_latency.py

clean:
	rm -rf .venv var test-artifacts
