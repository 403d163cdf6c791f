# The two commands of the README: `make run` and `make test`.
.PHONY: run test test-fast bench bench-quick bench-load cluster venv clean

venv:
	@bash scripts/bootstrap.sh

run:
	@bash scripts/run.sh

test:
	@bash scripts/test.sh

# The default tier only (SQLite, in-memory layer, browser if Chromium is there).
test-fast: venv
	@.venv/bin/python -m pytest -q -m "not browser"

# Two servers and two workers on PostgreSQL + Redis (DATABASE_URL, REDIS_URL).
cluster:
	@bash scripts/cluster.sh

bench: venv
	@.venv/bin/python bench/report.py

# Every benchmark at a smaller scale (about 10 minutes); the README table says so.
bench-quick: venv
	@.venv/bin/python bench/report.py --quick

# 200 concurrent sessions for 10 minutes on PostgreSQL + Redis (DATABASE_URL, REDIS_URL); about 13 min.
bench-load: venv
	@.venv/bin/python bench/load.py

clean:
	rm -rf .venv var test-artifacts
