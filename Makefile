# The two commands of the README: `make run` and `make test`.
.PHONY: run test test-fast bench cluster venv clean

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
	@.venv/bin/python bench/engine_overhead.py
	@.venv/bin/python bench/push_latency.py
	@.venv/bin/python bench/run_throughput.py
	@.venv/bin/python bench/page_render.py
	@.venv/bin/python bench/worker_memory.py

clean:
	rm -rf .venv var test-artifacts
