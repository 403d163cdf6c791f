"""The diagnostics view (task and channel-buffer counts) is off unless CMBAGENT_DIAGNOSTICS is set, and loopback-only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import RequestFactory

from cmbagent_site.diagnostics import diagnostics

PROJECT_DIR = Path(__file__).resolve().parents[1]


def _routed(env_value: str | None) -> bool:
    """Whether /_diagnostics/ resolves in a fresh process whose environment has CMBAGENT_DIAGNOSTICS=env_value."""
    env = {k: v for k, v in os.environ.items() if k != "CMBAGENT_DIAGNOSTICS"}
    if env_value is not None:
        env["CMBAGENT_DIAGNOSTICS"] = env_value
    program = (
        "import django, json\ndjango.setup()\nfrom django.conf import settings\nfrom django.urls import Resolver404, resolve\n"
        "try:\n    resolve('/_diagnostics/'); routed = True\nexcept Resolver404:\n    routed = False\n"
        "print(json.dumps([settings.DIAGNOSTICS, routed]))"
    )
    out = subprocess.run([sys.executable, "-c", program], cwd=PROJECT_DIR, env={**env, "DJANGO_SETTINGS_MODULE": "cmbagent_site.settings"},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    flag, routed = json.loads(out.strip().splitlines()[-1])
    assert flag == routed
    return routed


def test_off_by_default():
    assert _routed(None) is False
    assert _routed("0") is False
    assert _routed("1") is True


@pytest.mark.django_db
def test_not_routed_here(client, admin_user):
    """This test process has it off: a 404 for everyone, the superuser included."""
    assert client.get("/_diagnostics/").status_code == 404
    client.force_login(admin_user)
    assert client.get("/_diagnostics/").status_code == 404


async def test_when_on_it_answers_loopback_only(settings):
    from django.http import Http404

    settings.DIAGNOSTICS = True
    factory = RequestFactory()  # (the async one always says the client is 127.0.0.1)
    response = await diagnostics(factory.get("/_diagnostics/", REMOTE_ADDR="127.0.0.1"))
    body = json.loads(response.content)
    assert response.status_code == 200 and body["tasks"] >= 1 and body["receive_buffers"] == 0
    for address in ("10.0.0.7", "192.168.1.2", "", "not-an-address"):
        with pytest.raises(Http404):
            await diagnostics(factory.get("/_diagnostics/", REMOTE_ADDR=address))
    settings.DIAGNOSTICS = False
    with pytest.raises(Http404):
        await diagnostics(factory.get("/_diagnostics/", REMOTE_ADDR="127.0.0.1"))
