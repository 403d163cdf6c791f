from __future__ import annotations

import copy
import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_settings(settings, tmp_path):
    """Each test gets fresh channel layers (bound to its own event loop) and its own run folder."""
    settings.CHANNEL_LAYERS = copy.deepcopy(settings.CHANNEL_LAYERS)
    settings.RUNS_DIR = tmp_path / "runs"


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="alice-pass-123")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user(username="bob", password="bob-pass-123")


@pytest.fixture
def approver(django_user_model):
    """Staff with the approvals permission: decides any session's requests."""
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("carol", password="x-Pa55word!", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="approvals"))
    return django_user_model.objects.get(pk=user.pk)


def pytest_configure(config):
    from django.conf import settings

    # The server keeps connections open (CONN_MAX_AGE); tests open them from
    # many threads, and a kept one would outlive the test database and block
    # its teardown.
    settings.DATABASES["default"]["CONN_MAX_AGE"] = 0
    # Users are made by the hundred here; the real hasher's deliberate slowness
    # only costs time (login itself is tested against the real hasher in the
    # browser tier, whose server runs with the project's settings).
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


REDIS_URL = os.environ.get("REDIS_URL") or os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_configured_layer(settings):
    """The project's Redis channel layer, as configured, on a real Redis under a prefix of this process's own
    (skipped without Redis, a failure under CI)."""
    import redis
    from channels.layers import get_channel_layer

    from cmbagent_site.channel_layers import redis_layer

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI") in ("true", "1"):
            pytest.fail(f"Redis is required under CI ({REDIS_URL}): {exc}")
        pytest.skip(f"Redis is not reachable at {REDIS_URL}")
    settings.CHANNEL_LAYERS = {"default": redis_layer(REDIS_URL, prefix=f"test-layer-{os.getpid()}")}
    return get_channel_layer()
