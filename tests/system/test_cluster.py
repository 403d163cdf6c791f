"""Two servers and two workers on PostgreSQL + Redis: kills, cancels and full restarts lose and repeat nothing."""
from __future__ import annotations

import asyncio
import time
import urllib.request

from orchestrator.engine import SwarmOrchestrator
from orchestrator.engine.hitl import Answer, open_request

TASKS = [f"Compute damped acoustic mode number {i} of the CMB and plot it" for i in range(8)]


def _reference(tmp_path, task: str, mode: str, answers: tuple[str, ...] = ()) -> list[tuple]:
    """The team's transcript for ``task`` in one process, never interrupted (answering ``answers`` in order)."""

    async def collect():
        log, pending = [], list(answers)
        while True:
            engine = SwarmOrchestrator(task=task, mode=mode, work_dir=tmp_path / "reference")
            stream = engine.resume(log, Answer(pending.pop(0))) if open_request(log) else engine.run(log)
            log.extend([event async for event, _ in stream])
            if engine.outcome.status != "waiting":
                return [(str(e.kind), e.agent, e.content) for e in log if e.kind != "status"]

    return asyncio.run(collect())


def _team_events(rows, cluster=None, session_id=None) -> list[tuple]:
    """The team's conversation: not status notes, nor a person's round-budget questions and answers."""
    budget = set()
    if cluster is not None:
        budget = {seq for (seq,) in cluster.sql(
            "SELECT seq FROM agent_sessions_event WHERE session_id = %s AND data->>'request' = 'budget'", session_id
        )}
    return [(kind, agent, content) for seq, kind, agent, content in rows if kind != "status" and seq not in budget]


def test_workers_killed_mid_run_lose_and_repeat_nothing(cluster, tmp_path):
    cluster.start_server("server-a")
    cluster.start_server("server-b")
    cluster.start_worker("worker-1")
    cluster.start_worker("worker-2")
    sessions = [cluster.start_session(task, "planning_and_control") for task in TASKS]

    kills = 0
    deadline = time.monotonic() + 120
    while kills < 6 and time.monotonic() < deadline:
        # A worker holding a run that is under way: kill it there, and start it again.
        held = cluster.sql(
            "SELECT DISTINCT r.lease_owner FROM agent_sessions_run r JOIN agent_sessions_session s ON s.id = r.session_id "
            "WHERE r.status = 'running' AND r.lease_owner <> '' AND s.last_seq > 4"
        )
        pids = {int(owner.split(":")[1]) for (owner,) in held}
        victim = next((name for name, p in cluster.processes.items() if name.startswith("worker") and p.pid in pids), None)
        if victim is None:
            if all(cluster.status(s) == "completed" for s in sessions):
                # Everything finished before enough kills: queue more work and go on.
                sessions += [cluster.start_session(TASKS[kills], "planning_and_control")]
            time.sleep(0.05)
            continue
        cluster.kill(victim)
        kills += 1
        cluster.start_worker(victim)
        time.sleep(0.4)
    assert kills >= 5, f"only {kills} kills landed mid-run"

    cluster.wait_until(lambda: all(cluster.status(s) == "completed" for s in sessions), 180, "every session to complete")
    taken_over = cluster.sql("SELECT count(*) FROM agent_sessions_event WHERE kind = 'status' AND content LIKE 'Taken over%%'")[0][0]
    assert taken_over >= 1
    references = {}
    for session_id in sessions:
        task = cluster.sql("SELECT task FROM agent_sessions_session WHERE id = %s", session_id)[0][0]
        if task not in references:
            references[task] = _reference(tmp_path / str(len(references)), task, "planning_and_control")
        rows = cluster.events(session_id)
        assert [seq for seq, *_ in rows] == list(range(1, len(rows) + 1)), session_id
        assert _team_events(rows) == references[task], session_id


def test_cancel_a_code_loop_within_two_seconds_while_servers_answer(cluster):
    server = cluster.start_server("server-a")
    cluster.start_worker("worker-1")
    session = cluster.start_session("Plot a damped cosine", "one_shot", {"approve_code": True})
    cluster.wait_until(lambda: cluster.status(session) == "waiting_approval", 60, "the code guard")
    cluster.shell(
        "from django.contrib.auth.models import User\nfrom sessions import services\nfrom orchestrator.engine.hitl import Answer\n"
        f"services.session_answer(session_id={session!r}, user=User.objects.get(username='alice'), "
        "answer=Answer('edit', edits={'code': 'while True:\\n    pass\\n'}))\nemit(1)"
    )
    cluster.wait_until(lambda: any(kind == "tool_call" for _, kind, *_ in cluster.events(session)), 60, "the loop to start")
    time.sleep(1)  # well inside the loop
    # What services.session_cancel records for a running run (a shell process would add its own start-up to the clock).
    cluster.sql("UPDATE agent_sessions_run SET stop_request = 'cancelled' WHERE session_id = %s AND status = 'running'", session)
    asked = time.monotonic()
    answered = 0
    while cluster.status(session) != "cancelled":
        with urllib.request.urlopen(server + "/healthz", timeout=1) as resp:
            answered += resp.status == 200
        assert time.monotonic() - asked < 2.0, "not cancelled within 2 s"
    assert answered >= 1


def test_restart_of_the_whole_stack_while_paused_and_waiting(cluster, tmp_path):
    cluster.start_server("server-a")
    cluster.start_worker("worker-1")
    waiting = cluster.start_session(TASKS[0], "hitl_plan")
    paused = cluster.start_session(TASKS[1], "planning_and_control", {"max_turns": 5})
    cluster.wait_until(lambda: cluster.status(waiting) == "waiting_approval" and cluster.status(paused) == "paused", 60, "pause and wait")
    before = {s: cluster.events(s) for s in (waiting, paused)}

    cluster.stop_all()  # SIGKILL everything
    cluster.start_server("server-a")
    cluster.start_worker("worker-2")
    assert {s: cluster.events(s) for s in (waiting, paused)} == before  # a restart alone changes nothing
    cluster.shell(
        "from django.contrib.auth.models import User\nfrom sessions import services\nfrom orchestrator.engine.hitl import Answer\n"
        "alice = User.objects.get(username='alice')\n"
        f"services.session_answer(session_id={waiting!r}, user=alice, answer=Answer('approve'))\n"
        f"services.session_continue(session_id={paused!r}, user=alice)\nemit(1)"
    )
    while cluster.status(paused) != "completed":
        cluster.wait_until(lambda: cluster.status(paused) in ("paused", "completed"), 60, "the next pause")
        if cluster.status(paused) == "paused":
            cluster.shell(
                "from django.contrib.auth.models import User\nfrom sessions import services\n"
                f"services.session_continue(session_id={paused!r}, user=User.objects.get(username='alice'))\nemit(1)"
            )
    cluster.wait_until(lambda: cluster.status(waiting) == "completed", 60, "the approved session to complete")

    for session_id, task, mode, answers in [(waiting, TASKS[0], "hitl_plan", ("approve",)), (paused, TASKS[1], "planning_and_control", ())]:
        rows = cluster.events(session_id)
        assert rows[: len(before[session_id])] == before[session_id]  # it went on from where it stopped
        assert [seq for seq, *_ in rows] == list(range(1, len(rows) + 1))
        expected = _reference(tmp_path / mode, task, mode, answers)
        assert _team_events(rows, cluster, session_id) == expected
