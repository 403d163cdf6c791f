"""The Python API: sessions run without the web app and continue from another process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings

from orchestrator import api
from sessions.models import Event, Session

pytestmark = pytest.mark.django_db(transaction=True)


def test_quick_and_full_swarm_complete():
    quick = api.quick_swarm("Plot a damped cosine")
    full = api.full_swarm("Plot a damped cosine")
    assert (quick.status, full.status) == ("completed", "completed")
    assert full.events > quick.events > 10
    assert Session.objects.get(pk=full.session_id).mode == "planning_and_control"


def test_copilot_pauses_and_continues_to_completion():
    result = api.copilot("Plot a damped cosine", max_rounds=2)
    assert result.status == "paused"
    rounds = 0
    while result.status == "paused":
        result = api.continue_copilot(result.session_id)
        rounds += 1
        assert rounds < 10
    assert result.status == "completed"
    seqs = list(Event.objects.filter(session_id=result.session_id).values_list("seq", flat=True).order_by("seq"))
    assert seqs == list(range(1, len(seqs) + 1))


def test_continue_copilot_works_from_a_new_process():
    """Nothing lives in memory between calls: a fresh interpreter continues the stored session."""
    first = api.copilot("Plot a damped cosine", max_rounds=2)
    assert first.status == "paused"
    db = django_settings.DATABASES["default"]
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "cmbagent_site.settings"}
    if db["ENGINE"].endswith("sqlite3"):
        env.pop("DATABASE_URL", None)
        env["CMBAGENT_VAR_DIR"] = str(Path(db["NAME"]).parent)
        code_db = f"settings.DATABASES['default']['NAME'] = {str(db['NAME'])!r}"
    else:
        code_db = f"settings.DATABASES['default']['NAME'] = {db['NAME']!r}"
    code = (
        "import django, json, os\n"
        "from django.conf import settings\n"
        f"{code_db}\n"
        "django.setup()\n"
        "from orchestrator import api\n"
        f"r = api.continue_copilot({str(first.session_id)!r})\n"
        "print(json.dumps({'status': r.status, 'events': r.events}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] in ("paused", "completed") and result["events"] > first.events
    assert Session.objects.get(pk=first.session_id).last_seq == result["events"]


def test_continue_of_a_finished_session_is_refused():
    done = api.quick_swarm("Plot a damped cosine")
    with pytest.raises(Exception, match="Only a paused session can be continued"):
        api.continue_copilot(done.session_id)
