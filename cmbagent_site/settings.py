"""Settings, read from the environment.

DATABASE_URL  default: a SQLite file (WAL) under var/
REDIS_URL     unset: in-memory channel layer; set: channels-redis
SECRET_KEY    generated once into var/secret_key for local use; required when DEBUG is off
DEBUG         "1"/"true" to turn on (default on for the embedded local setup)
ALLOWED_HOSTS comma-separated (default: localhost names)
EMBEDDED_WORKER  "0" to keep the run worker out of the server process
CMBAGENT_DIAGNOSTICS  "1" to serve /_diagnostics/ to loopback clients (task and channel-buffer counts; tests only)
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from cmbagent_site.channel_layers import redis_layer

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("CMBAGENT_VAR_DIR", BASE_DIR / "var"))


def _private(path: Path) -> Path:
    """Create ``path`` closed to other users: agent code runs as another user and must not read the database."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_uid == os.geteuid():
        path.chmod(0o700)
    return path


_private(VAR_DIR)


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


DEBUG = _flag("DEBUG", True)
# Django's debug pages hide settings named like secrets; URLs and the channel layers carry passwords too.
DEFAULT_EXCEPTION_REPORTER_FILTER = "cmbagent_site.views.SecretSettingsFilter"


def _secret_key() -> str:
    if key := os.environ.get("SECRET_KEY"):
        return key
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [o.strip() for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o.strip()]

INSTALLED_APPS = [
    "daphne",
    "orchestrator",  # before channels: its runworker also starts the run worker
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "csp",
    "template_partials",
    "sessions.apps.AgentSessionsConfig",
    "approvals",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "csp.middleware.CSPMiddleware",
    # Sync-only, and last: Django then runs the whole stack on the request's thread in one go. Placed
    # before async-capable middleware, it made each of their hooks hop between the event loop and that
    # thread (17 crossings a request instead of 5; tests/test_middleware.py). It still runs before any view.
    "cmbagent_site.middleware.RefuseNulMiddleware",
]

# A strict Content Security Policy: scripts, styles and sockets from this origin
# only; no inline script or style, no eval, no plugins, no framing. Agent output
# is sanitised before it reaches a page; this is the second wall.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'none'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
        "base-uri": ["'none'"],
        "object-src": ["'none'"],
    },
}

ROOT_URLCONF = "cmbagent_site.urls"
ASGI_APPLICATION = "cmbagent_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _postgres_pool() -> dict:
    """Options of PostgreSQL's connection pool (psycopg-pool, Django's ``pool`` option).

    Under ASGI each request runs on a thread of its own, so a connection kept
    per thread (``CONN_MAX_AGE``) is never used twice: without a pool every
    request would open one (5-8 ms on loopback). The pool keeps them open and
    hands one to each request or database call, which returns it when done.

    ``timeout`` bounds the wait for a connection, so during an outage a request
    fails within it (``/healthz`` answers 503) instead of hanging (while every
    connection is open and in use, the database is only busy, and a request
    waits longer: ``DB_POOL_BUSY_TIMEOUT``); a pool
    gives up reconnecting after ``reconnect_timeout``, and the next request
    tries again at once, so it recovers within seconds of the database's return.
    After a restart its idle connections are broken: the engine
    (``cmbagent_site.postgresql``) replaces them all when it meets the first.
    """
    return {
        "min_size": int(os.environ.get("DB_POOL_MIN_SIZE", "2")),
        "max_size": int(os.environ.get("DB_POOL_MAX_SIZE", "20")),
        "timeout": float(os.environ.get("DB_POOL_TIMEOUT", "2")),
        "reconnect_timeout": 4.0,
    }


def _database() -> dict:
    url = os.environ.get("DATABASE_URL")
    if url:
        db = dj_database_url.parse(url, conn_max_age=600, conn_health_checks=True)
        if db["ENGINE"] == "django.db.backends.postgresql" and os.environ.get("DB_POOL", "1") != "0":
            db["ENGINE"] = "cmbagent_site.postgresql"  # Django's, checking each pooled connection as it hands it out
            db["CONN_MAX_AGE"] = 0  # the pool keeps the connections; Django hands each back when done
            db["CONN_HEALTH_CHECKS"] = False  # done by the engine above, once per connection handed out
            db.setdefault("OPTIONS", {})["pool"] = _postgres_pool()
    else:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        db = {"ENGINE": "django.db.backends.sqlite3", "NAME": VAR_DIR / "db.sqlite3", "CONN_MAX_AGE": 600}
    if db["ENGINE"] == "django.db.backends.sqlite3":
        db.setdefault("OPTIONS", {}).update(
            {
                # WAL lets readers go on while the worker writes; IMMEDIATE takes the
                # write lock at BEGIN so that concurrent writers queue instead of failing.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
            }
        )
        # A file, not shared-cache memory: threads in tests then lock like real processes do.
        # One per test process, so that two test runs in one checkout never share it.
        db.setdefault("TEST", {}).setdefault("NAME", str(VAR_DIR / f"test-{os.getpid()}.sqlite3"))
    return db


DATABASES = {"default": _database()}
# How long a request waits in all for a pooled PostgreSQL connection while every one is in use (the
# database answers but is busy), before it fails (cmbagent_site.postgresql).
DB_POOL_BUSY_TIMEOUT = float(os.environ.get("DB_POOL_BUSY_TIMEOUT", "30"))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {"default": redis_layer(REDIS_URL, os.environ.get("CHANNELS_PREFIX", "cmbagent"))}
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

EMBEDDED_WORKER = _flag("EMBEDDED_WORKER", True)
# Off by default: see cmbagent_site/diagnostics.py.
DIAGNOSTICS = _flag("CMBAGENT_DIAGNOSTICS", False)
WORKER_MAX_RUNS = int(os.environ.get("WORKER_MAX_RUNS", "4"))
WORKER_LEASE_SECONDS = int(os.environ.get("WORKER_LEASE_SECONDS", "30"))
# Run processes each worker keeps forked ahead, waiting for the next run (0: fork each run when it starts).
WORKER_SPARE_PROCESSES = int(os.environ.get("WORKER_SPARE_PROCESSES", "1"))
# The session page shows this many of the newest events and loads older ones as the reader scrolls up.
TRANSCRIPT_WINDOW = int(os.environ.get("TRANSCRIPT_WINDOW", "200"))
# Approval requests: seconds until the expiry policy applies (0: never), and that policy.
APPROVAL_TIMEOUT_SECONDS = int(os.environ.get("APPROVAL_TIMEOUT_SECONDS", "0"))
APPROVAL_EXPIRY_POLICY = os.environ.get("APPROVAL_EXPIRY_POLICY", "pending")  # reject, approve or pending
# Address-space limit of each run's process (the engine); executed code has its own, smaller limits.
RUN_MEMORY_LIMIT_MB = int(os.environ.get("RUN_MEMORY_LIMIT_MB", "4096"))
RUNS_DIR = Path(os.environ.get("RUNS_DIR", VAR_DIR / "runs"))  # closed to agent code too: see CodeRunner
TASK_MAX_CHARS = 20_000
# Per user: sessions queued or running at once (0: no limit); socket messages a page may send per second.
MAX_LIVE_RUNS_PER_USER = int(os.environ.get("MAX_LIVE_RUNS_PER_USER", "10"))
SOCKET_MESSAGES_PER_SECOND = float(os.environ.get("SOCKET_MESSAGES_PER_SECOND", "20"))

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "sessions:list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", VAR_DIR / "static"))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"]
# Serve straight from the app and project folders: no collectstatic step needed
# for the embedded default. A production layout runs collectstatic.
WHITENOISE_USE_FINDERS = True

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "sessions": {"level": "INFO"},
        "orchestrator": {"level": "INFO"},
        "approvals": {"level": "INFO"},
        "django.channels.server": {"level": "WARNING"},
        # autogen warns once per non-text message on every model call of the
        # replay client: quadratic noise in a long run.
        "autogen_core.events": {"level": "ERROR"},
    },
}
