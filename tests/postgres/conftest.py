"""Tests of PostgreSQL itself: collected only when the suite runs on it (tier 2), never skipped."""
import os

if not os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")):
    collect_ignore_glob = ["test_*.py"]
