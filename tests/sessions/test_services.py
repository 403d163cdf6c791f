"""Session services: starting, the event log, versioned state, run leases."""
from __future__ import annotations

import re
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import F
from django.utils import timezone

from orchestrator.engine.events import EngineEvent, EventKind
from sessions import services
from sessions.models import Event, Run, Session, SessionState


@pytest.fixture
def session(alice):
    return services.session_start(owner=alice, task="Estimate the Hubble constant", mode="one_shot")


def _state_args(phase: str = "planning") -> dict:
    return {"conversation_history": [], "context_variables": {"k": 1}, "current_phase": phase, "current_step": 1}


@pytest.mark.django_db
class TestSessionStart:
    def test_creates_session_state_queued_run_and_first_event(self, alice):
        """A new session has its state row, a queued run #1 and a 'queued' status event at seq 1."""
        session = services.session_start(owner=alice, task="  Fit the CMB power spectrum  ", mode="planning_and_control")
        assert session.task == "Fit the CMB power spectrum"
        assert session.title == "Fit the CMB power spectrum"
        assert session.status == "queued" and session.last_seq == 1
        assert SessionState.objects.get(session=session).version == 0
        assert list(Run.objects.filter(session=session).values_list("number", "status")) == [(1, "queued")]
        event = Event.objects.get(session=session)
        assert (event.seq, event.kind, event.data) == (1, "status", {"status": "queued"})

    def test_the_started_session_is_returned_as_stored(self, alice):
        """session_start returns the session as committed (queued, its first event counted), without reading it back."""
        session = services.session_start(owner=alice, task="  Fit the spectrum ", mode="one_shot", config={"max_turns": 5})
        fresh = Session.objects.get(pk=session.pk)
        fields = ("status", "last_seq", "task", "title", "mode", "config", "model_provider", "created_at", "updated_at")
        assert [getattr(session, f) for f in fields] == [getattr(fresh, f) for f in fields]
        assert (session.status, session.last_seq, session.task) == ("queued", 1, "Fit the spectrum")

    @pytest.mark.parametrize(
        ("task", "mode", "message"),
        [
            ("   ", "one_shot", "The task is empty."),
            ("x" * 100_000, "one_shot", "limit is 20,000"),
            ("fine", "make_coffee", "Unknown mode 'make_coffee'"),
        ],
    )
    def test_bad_input_is_refused_and_writes_nothing(self, alice, task, mode, message):
        """Empty or oversized tasks and unknown modes raise a clear SessionError; no row is written."""
        with pytest.raises(services.SessionError, match=message):
            services.session_start(owner=alice, task=task, mode=mode)
        assert not Session.objects.exists() and not Event.objects.exists() and not Run.objects.exists()


@pytest.mark.django_db
class TestSaveSessionState:
    def test_save_bumps_version(self, session):
        """A save without interference applies the fields and bumps the version by one."""
        assert services.save_session_state(session.pk, **_state_args("control"), plan=[{"number": 1}]) == 1
        state = SessionState.objects.get(pk=session.pk)
        assert (state.version, state.current_phase, state.plan, state.context_variables) == (1, "control", [{"number": 1}], {"k": 1})

    def test_history_is_bounded(self, session):
        """Only the tail of the conversation is kept in the state row."""
        history = [{"content": str(i)} for i in range(500)]
        services.save_session_state(session.pk, **{**_state_args(), "conversation_history": history})
        kept = SessionState.objects.get(pk=session.pk).conversation_history
        assert len(kept) == services.HISTORY_TAIL and kept[-1] == {"content": "499"}

    def test_conflict_is_retried_once(self, session, monkeypatch):
        """Another writer between read and write: the save is retried with the new version and applied."""
        real = services._read_version
        reads = []

        def racing(session_id):
            version = real(session_id)
            reads.append(version)
            if len(reads) == 1:
                SessionState.objects.filter(pk=session_id).update(version=F("version") + 1, current_phase="other")
            return version

        monkeypatch.setattr(services, "_read_version", racing)
        assert services.save_session_state(session.pk, **_state_args("mine")) == 2
        state = SessionState.objects.get(pk=session.pk)
        assert reads == [0, 1]
        assert (state.version, state.current_phase) == (2, "mine")

    def test_a_state_read_before_another_writer_is_read_again_and_left_as_committed(self, session):
        """Saving with the row as read earlier: a writer in between makes the save read the row again and retry,
        and the object ends as the row committed, the other writer's plan included (this save left the plan)."""
        mine = SessionState.objects.get(pk=session.pk)
        SessionState.objects.filter(pk=session.pk).update(version=F("version") + 1, plan=[{"number": 7}], current_phase="other")
        assert services.save_session_state(session.pk, **_state_args("mine"), state=mine) == 2
        assert (mine.version, mine.plan, mine.current_phase) == (2, [{"number": 7}], "mine")
        stored = SessionState.objects.get(pk=session.pk)
        assert (stored.version, stored.plan, stored.current_phase) == (2, [{"number": 7}], "mine")

    def test_second_conflict_raises_and_writes_nothing(self, session, monkeypatch):
        """Two conflicts in a row raise StateConflictError; the other writer's state stays intact."""
        real = services._read_version

        def always_racing(session_id):
            version = real(session_id)
            SessionState.objects.filter(pk=session_id).update(version=F("version") + 1, current_phase="other")
            return version

        monkeypatch.setattr(services, "_read_version", always_racing)
        with pytest.raises(services.StateConflictError, match="changed by another writer twice"):
            services.save_session_state(session.pk, **_state_args("mine"))
        state = SessionState.objects.get(pk=session.pk)
        assert (state.version, state.current_phase) == (2, "other")


@pytest.mark.django_db(transaction=True)
def test_concurrent_saves_lose_nothing(alice):
    """Concurrent saves each either apply (bumping the version once) or raise; none vanish silently."""
    session = services.session_start(owner=alice, task="t", mode="one_shot")
    applied, refused = [], []
    barrier = threading.Barrier(8)

    def save(n: int) -> None:
        barrier.wait()
        try:
            for i in range(5):
                applied.append(services.save_session_state(session.pk, **_state_args(f"w{n}-{i}")))
        except services.StateConflictError:
            refused.append(n)
        finally:
            connection.close()

    threads = [threading.Thread(target=save, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    state = SessionState.objects.get(pk=session.pk)
    assert state.version == len(applied)
    assert sorted(applied) == list(range(1, len(applied) + 1))
    assert len(applied) + len(refused) >= 8


@pytest.mark.django_db(transaction=True)
def test_event_seq_is_contiguous_under_concurrent_appends(alice):
    """Appends from many threads get seqs 1..N exactly once, and last_seq matches."""
    session = services.session_start(owner=alice, task="t", mode="one_shot")
    barrier = threading.Barrier(6)
    errors = []

    def append(n: int) -> None:
        barrier.wait()
        try:
            for i in range(10):
                services.event_append(
                    session_id=session.pk,
                    run_id=None,
                    event=EngineEvent(EventKind.MESSAGE, agent=f"agent{n}", content=str(i), prompt_tokens=2),
                    checkpoint={"phase": "p", "step": i},
                )
        except Exception as exc:  # noqa: BLE001 - collected and asserted on below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=append, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    seqs = list(Event.objects.filter(session=session).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, 62))
    session.refresh_from_db()
    assert session.last_seq == 61 and session.prompt_tokens == 120
    assert SessionState.objects.get(pk=session.pk).version == 60


@pytest.mark.django_db
class TestRunLease:
    def test_claim_takes_queued_run_and_records_running(self, session):
        """Claiming marks the run running under this worker's lease and logs a status event."""
        run = services.run_claim(worker_id="w1", lease_seconds=30)
        assert run.session_id == session.pk and run.status == "running" and re.fullmatch(r"w1#[0-9a-f]{8}", run.lease_owner)
        assert services.run_claim(worker_id="w2", lease_seconds=30) is None
        session.refresh_from_db()
        assert session.status == "running"
        assert Event.objects.filter(session=session).latest("seq").data == {"status": "running"}

    def test_a_claim_keeps_the_session_as_it_left_it(self, session, django_assert_num_queries):
        """The claim's worker builds the run from the session the claim locked and wrote: it need not read it again."""
        run = services.run_claim(worker_id="w1", lease_seconds=30)
        with django_assert_num_queries(0):
            kept = run.session
        fresh = Session.objects.get(pk=session.pk)
        fields = ("status", "last_seq", "task", "mode", "config", "model_provider", "updated_at")
        assert [getattr(kept, f) for f in fields] == [getattr(fresh, f) for f in fields]
        assert (kept.status, kept.last_seq) == ("running", 2)

    def test_expired_lease_is_taken_over(self, session):
        """A run whose worker stopped heartbeating is claimed again by another worker."""
        run = services.run_claim(worker_id="w1", lease_seconds=30)
        Run.objects.filter(pk=run.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        again = services.run_claim(worker_id="w2", lease_seconds=30)
        assert again.pk == run.pk and again.lease_owner.startswith("w2#")
        assert not services.run_heartbeat(run_id=run.pk, worker_id=run.lease_owner, lease_seconds=30)
        assert services.run_heartbeat(run_id=run.pk, worker_id=again.lease_owner, lease_seconds=30)

    def test_a_lapsed_claim_is_fenced_off_even_from_its_own_worker(self, session):
        """Every claim is a new fence: the first execution of a run its own worker claimed again writes nothing more."""
        first = services.run_claim(worker_id="w1", lease_seconds=30)
        Run.objects.filter(pk=first.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        assert services.run_claim(worker_id="w1", lease_seconds=30, exclude={first.pk}) is None  # not while executing it
        second = services.run_claim(worker_id="w1", lease_seconds=30)
        assert second.pk == first.pk and second.lease_owner != first.lease_owner
        message = EngineEvent(EventKind.MESSAGE, agent="engineer", content="from the first execution")
        with pytest.raises(services.LeaseLostError):
            services.event_append(session_id=session.pk, run_id=first.pk, event=message, worker_id=first.lease_owner)
        with pytest.raises(services.SessionError):
            services.run_finish(run_id=first.pk, worker_id=first.lease_owner, status="completed")
        assert not Event.objects.filter(session=session, content="from the first execution").exists()

    def test_one_watch_serves_every_run_of_a_worker(self, session, alice, django_assert_max_num_queries):
        """Stop requests, lost leases and renewed leases of all a worker's runs in two queries."""
        others = [services.session_start(owner=alice, task=f"t{i}", mode="one_shot") for i in range(3)]
        runs = [services.run_claim(worker_id="w1", lease_seconds=30) for _ in range(4)]
        held = {run.pk: run.lease_owner for run in runs}
        Run.objects.filter(pk=runs[0].pk).update(stop_request="cancelled")
        Run.objects.filter(pk=runs[1].pk).update(lease_owner="w2#feedbeef")  # taken over
        Run.objects.filter(pk__in=list(held)).update(lease_expires_at=timezone.now() + timedelta(seconds=5))
        with django_assert_max_num_queries(2):
            stops, lost = services.runs_watch(held=held, lease_seconds=30, beat=True)
        assert stops == {runs[0].pk: "cancelled"} and lost == {runs[1].pk}
        renewed = dict(Run.objects.filter(pk__in=list(held)).values_list("pk", "lease_expires_at"))
        assert renewed[runs[2].pk] > timezone.now() + timedelta(seconds=25) and renewed[runs[3].pk] > timezone.now() + timedelta(seconds=25)
        assert renewed[runs[1].pk] < timezone.now() + timedelta(seconds=6)  # not renewed for the worker that lost it
        assert len(others) == 3

    def test_only_the_lease_holder_finishes(self, session):
        """A worker that lost the lease cannot record the outcome."""
        run = services.run_claim(worker_id="w1", lease_seconds=30)
        with pytest.raises(services.SessionError, match="held by w1#"):
            services.run_finish(run_id=run.pk, worker_id="w2", status="completed")
        services.run_finish(run_id=run.pk, worker_id=run.lease_owner, status="failed", detail="boom")
        run.refresh_from_db()
        session.refresh_from_db()
        assert (run.status, run.error, session.status) == ("failed", "boom", "failed")
        assert run.finished_at is not None


@pytest.mark.django_db(transaction=True)
class TestBatchedWrites:
    """A worker writes whatever its run produced while the last write committed, in one transaction."""

    def test_events_and_their_checkpoint_are_one_write_announced_once(self, alice, monkeypatch):
        session = services.session_start(owner=alice, task="Batch", mode="one_shot")
        run = services.run_claim(worker_id="w1", lease_seconds=30)
        base = Session.objects.get(pk=session.pk).last_seq  # the queued and running status events
        notes = []
        monkeypatch.setattr(services, "_send", lambda kind, target, message: notes.append(message))
        events = [
            EngineEvent(EventKind.MESSAGE, agent="engineer", content=f"m{i}", prompt_tokens=10, completion_tokens=5, cost_usd=0.001)
            for i in range(5)
        ]
        checkpoint = {"phase": "execution", "step": 2, "plan": [{"n": 1}], "context_variables": {"k": 2}}
        rows = services.events_append(
            session_id=session.pk, run_id=run.pk, events=events, checkpoint=checkpoint,
            conversation_tail=[{"agent": "engineer", "content": "m4"}], worker_id=run.lease_owner,
        )
        assert [row.seq for row in rows] == [base + i for i in range(1, 6)]
        assert [row.pk is not None for row in rows] == [True] * 5
        stored = list(Event.objects.filter(session=session, seq__gt=base).order_by("seq").values_list("seq", "content"))
        assert stored == [(base + i + 1, f"m{i}") for i in range(5)]
        session.refresh_from_db()
        state = SessionState.objects.get(session=session)
        assert session.last_seq == base + 5 and (session.prompt_tokens, session.completion_tokens) == (50, 25)
        assert session.usage["engineer"] == {"prompt": 50, "completion": 25, "cost": 0.005}
        assert state.version == 1 and (state.current_phase, state.current_step, state.plan) == ("execution", 2, [{"n": 1}])
        [note] = [n for n in notes if n["type"] == "session.event"]
        assert (note["first"], note["seq"]) == (base + 1, base + 5)
        assert re.findall(r'data-seq="(\d+)"', note["html"]) == [str(base + i) for i in range(1, 6)]

    def test_a_batch_reads_its_session_and_state_once_with_the_lock(self, alice, monkeypatch):
        """One read (the session and its state, with the session's lock), the session's update (which carries the
        fence), the rows, the state's update: nothing read again, neither for the fence, the state's version nor
        the fragment."""
        from django.test.utils import CaptureQueriesContext

        session = services.session_start(owner=alice, task="Batch", mode="one_shot")
        run = services.run_claim(worker_id="w1", lease_seconds=30)
        monkeypatch.setattr(services, "_send", lambda kind, target, message: None)
        with CaptureQueriesContext(connection) as queries:
            services.events_append(
                session_id=session.pk, run_id=run.pk, worker_id=run.lease_owner, checkpoint={"phase": "execution"},
                events=[EngineEvent(EventKind.MESSAGE, agent="engineer", content=f"m{i}", prompt_tokens=3) for i in range(3)],
            )
        statements = [q["sql"].split()[0].upper() for q in queries]
        statements = [verb for verb in statements if verb in {"SELECT", "INSERT", "UPDATE", "DELETE"}]
        assert statements == ["SELECT", "UPDATE", "INSERT", "UPDATE"], [q["sql"][:120] for q in queries]
        assert SessionState.objects.get(session=session).version == 1

    def test_the_fragment_rendered_in_the_write_is_the_one_the_committed_rows_render(self, alice, monkeypatch):
        """Rendered from the session and state as the write leaves them, not read back: the same HTML as a render
        from the database once committed, status, totals, usage, phase and plan included."""
        from sessions.fragments import render_push

        session = services.session_start(owner=alice, task="Batch", mode="planning_and_control")
        run = services.run_claim(worker_id="w1", lease_seconds=30)
        services.events_append(
            session_id=session.pk, run_id=run.pk, worker_id=run.lease_owner, checkpoint={"phase": "planning", "turns": 1},
            events=[EngineEvent(EventKind.MESSAGE, agent="planner", content="first", prompt_tokens=5, completion_tokens=2, cost_usd=0.0001)],
        )
        notes = []
        monkeypatch.setattr(services, "_send", lambda kind, target, message: notes.append(message))
        events = [
            EngineEvent(EventKind.MESSAGE, agent="engineer", content="**fit** it", prompt_tokens=11, completion_tokens=4, cost_usd=0.00125),
            EngineEvent(EventKind.MESSAGE, agent="planner", content="next", prompt_tokens=7, completion_tokens=1, cost_usd=0.0002),
            EngineEvent(EventKind.STATUS, content="The round budget is spent.", data={"status": "paused"}),
        ]
        checkpoint = {"phase": "control", "step": 1, "turns": 3, "continuations": 1,
                      "plan": [{"agent": "engineer", "description": "fit", "status": "in_progress"}], "context_variables": {"k": 1}}
        rows = services.events_append(session_id=session.pk, run_id=run.pk, worker_id=run.lease_owner, events=events,
                                      checkpoint=checkpoint, conversation_tail=[{"agent": "planner", "content": "next"}])
        [note] = [n for n in notes if n["type"] == "session.event"]
        fresh = Session.objects.select_related("state").get(pk=session.pk)
        assert fresh.status == "paused" and fresh.prompt_tokens == 23 and fresh.usage["engineer"]["prompt"] == 11
        assert note["html"] == render_push(fresh, rows)
        assert 'data-status="paused"' in note["html"] and "control" in note["html"]

    def test_the_fragment_is_rendered_in_the_write_and_only_sent_after_commit(self, alice, monkeypatch):
        """The pushed fragment shows the checkpoint written with it; once committed, announcing reads nothing more."""
        from django.test.utils import CaptureQueriesContext

        session = services.session_start(owner=alice, task="Batch", mode="one_shot")
        run = services.run_claim(worker_id="w1", lease_seconds=30)
        sent = []
        monkeypatch.setattr(services, "_send", lambda kind, target, message: sent.append(message))
        callbacks = []
        monkeypatch.setattr(services.transaction, "on_commit", lambda callback, *args, **kwargs: callbacks.append(callback))
        services.events_append(
            session_id=session.pk, run_id=run.pk, worker_id=run.lease_owner,
            events=[EngineEvent(EventKind.MESSAGE, agent="engineer", content="done", prompt_tokens=7, completion_tokens=3)],
            checkpoint={"phase": "execution", "step": 2, "plan": [{"agent": "engineer", "description": "fit", "status": "in_progress"}]},
        )
        assert Event.objects.filter(session=session, content="done").exists()  # committed, nothing announced yet
        assert sent == []
        with CaptureQueriesContext(connection) as queries:
            for callback in callbacks:
                callback()
        assert len(queries) == 0
        [note] = [n for n in sent if n["type"] == "session.event"]
        assert '<dd data-testid="phase">execution</dd>' in note["html"]
        assert '<dd data-testid="step">2 of 1</dd>' in note["html"]
        assert '<dd data-testid="tokens">10</dd>' in note["html"]

    def test_a_fragment_that_fails_to_render_still_lets_the_write_commit_and_announce(self, alice, monkeypatch):
        session = services.session_start(owner=alice, task="Batch", mode="one_shot")
        notes = []
        monkeypatch.setattr(services, "_send", lambda kind, target, message: notes.append(message))

        def broken(session, rows):
            raise ValueError("a template bug")

        monkeypatch.setattr(services, "render_push", broken)
        [row] = services.events_append(session_id=session.pk, run_id=None, events=[EngineEvent(EventKind.MESSAGE, content="kept")])
        assert Event.objects.get(session=session, seq=row.seq).content == "kept"
        [note] = [n for n in notes if n["type"] == "session.event"]
        assert (note["first"], note["seq"]) == (row.seq, row.seq) and "html" not in note  # sockets read the rows

    def test_a_database_error_while_rendering_fails_the_write_instead_of_committing_part_of_it(self, alice, monkeypatch):
        from django.db import OperationalError

        session = services.session_start(owner=alice, task="Batch", mode="one_shot")
        base = Session.objects.get(pk=session.pk).last_seq
        notes = []
        monkeypatch.setattr(services, "_send", lambda kind, target, message: notes.append(message))

        def lost(session, rows):
            raise OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(services, "render_push", lost)
        with pytest.raises(OperationalError):
            services.events_append(session_id=session.pk, run_id=None, events=[EngineEvent(EventKind.MESSAGE, content="x")], checkpoint={"phase": "p"})
        assert Session.objects.get(pk=session.pk).last_seq == base
        assert not Event.objects.filter(session=session, seq__gt=base).exists()
        assert SessionState.objects.get(session=session).current_phase != "p"
        assert [n for n in notes if n["type"] == "session.event"] == []

    def test_a_batch_after_the_lease_is_lost_writes_nothing(self, alice):
        session = services.session_start(owner=alice, task="Batch", mode="one_shot")
        run = services.run_claim(worker_id="w1", lease_seconds=30)
        Run.objects.filter(pk=run.pk).update(lease_owner="w2#feedbeef")
        base = Session.objects.get(pk=session.pk).last_seq
        version = SessionState.objects.get(session=session).version
        with pytest.raises(services.LeaseLostError):
            services.events_append(
                session_id=session.pk, run_id=run.pk, worker_id=run.lease_owner, checkpoint={"phase": "x"},
                events=[EngineEvent(EventKind.MESSAGE, agent="engineer", content=f"m{i}") for i in range(3)],
            )
        session.refresh_from_db()
        assert session.last_seq == base and Event.objects.filter(session=session).count() == base
        assert SessionState.objects.get(session=session).version == version

    def test_approval_requests_in_a_batch_are_each_recorded(self, alice):
        from approvals.models import ApprovalRequest

        session = services.session_start(owner=alice, task="Batch", mode="hitl_plan")
        run = services.run_claim(worker_id="w1", lease_seconds=30)
        ask = EngineEvent(EventKind.APPROVAL, agent="control", content="Run it?", data={"request": "code", "options": ["approve", "reject"]})
        services.events_append(
            session_id=session.pk, run_id=run.pk, worker_id=run.lease_owner,
            events=[EngineEvent(EventKind.MESSAGE, agent="engineer", content="code"), ask],
        )
        [request] = ApprovalRequest.objects.filter(session=session)
        last = Session.objects.get(pk=session.pk).last_seq
        assert (request.event_seq, request.kind, request.question) == (last, "code", "Run it?")


def test_a_user_may_have_only_so_many_live_sessions(alice, bob, settings):
    settings.MAX_LIVE_RUNS_PER_USER = 3
    started = [services.session_start(owner=alice, task=f"t{i}", mode="one_shot") for i in range(3)]
    with pytest.raises(services.SessionError, match=r"You have 3 sessions queued or running, the most allowed at once \(3\)"):
        services.session_start(owner=alice, task="one more", mode="one_shot")
    services.session_start(owner=bob, task="bob's own", mode="one_shot")  # the limit is per user
    services.session_suspend(session_id=started[0].pk, user=alice)
    services.session_start(owner=alice, task="now there is room", mode="one_shot")
    with pytest.raises(services.SessionError, match="the most allowed at once"):
        services.session_resume(session_id=started[0].pk, user=alice)  # resuming would make four
    assert Session.objects.filter(owner=alice).count() == 4


def test_nul_characters_are_stored_as_replacement_characters(alice):
    """PostgreSQL refuses NUL in text and JSON: agent output with NUL must not fail a run there (nor differ on SQLite)."""
    session = services.session_start(owner=alice, task="task with \x00 in it", mode="one_shot", config={})
    assert session.task == "task with \ufffd in it"
    row = services.event_append(
        session_id=session.pk, run_id=None,
        event=EngineEvent(EventKind.TOOL_RESULT, agent="exec\x00utor", content="binary \x00\x00 out",
                          data={"name": "execute_code", "raw": ["a\x00", {"k\x00": "v\x00"}]}, prompt_tokens=1),
        checkpoint={"phase": "ph\x00", "context_variables": {"x": "\x00"}, "plan": [{"description": "\x00"}]},
        conversation_tail=[{"content": "\x00"}],
    )
    row.refresh_from_db()
    assert (row.agent, row.content) == ("exec\ufffdutor", "binary \ufffd\ufffd out")
    assert row.data == {"name": "execute_code", "raw": ["a\ufffd", {"k\ufffd": "v\ufffd"}]}
    state = SessionState.objects.get(pk=session.pk)
    assert (state.current_phase, state.context_variables, state.plan[0]["description"]) == ("ph\ufffd", {"x": "\ufffd"}, "\ufffd")
    assert Session.objects.get(pk=session.pk).usage == {"exec\ufffdutor": {"prompt": 1, "completion": 0, "cost": 0.0}}


@pytest.mark.django_db(transaction=True)
class TestAnnouncementsHeld:
    """A worker's writes keep their announcements for the worker to send, off its database thread."""

    class Layer:
        def __init__(self) -> None:
            self.sent: list[tuple[str, str, dict]] = []

        async def group_send(self, group, message):
            self.sent.append(("group", group, message))

        async def send(self, channel, message):
            self.sent.append(("channel", channel, message))

    def test_a_start_wakes_the_workers_before_anything_else_is_announced(self, alice, monkeypatch):
        from sessions.groups import WORKER_CHANNEL

        layer = self.Layer()
        monkeypatch.setattr(services, "get_channel_layer", lambda: layer)
        services.session_start(owner=alice, task="Wake first", mode="one_shot")
        assert [(kind, target) for kind, target, _ in layer.sent][0] == ("channel", WORKER_CHANNEL)
        assert [message["type"] for _, _, message in layer.sent] == ["run.wake", "session.status"]

    def test_held_writes_commit_and_keep_their_notes_which_go_out_in_order_when_sent(self, alice, monkeypatch):
        from asgiref.sync import async_to_sync

        from sessions.groups import owner_group, session_group

        layer = self.Layer()
        monkeypatch.setattr(services, "get_channel_layer", lambda: layer)
        session = services.session_start(owner=alice, task="Held", mode="one_shot")
        layer.sent.clear()
        with services.announcements_held() as notes:
            run = services.run_claim(worker_id="w1", lease_seconds=30)
            services.events_append(
                session_id=session.pk, run_id=run.pk, worker_id=run.lease_owner,
                events=[EngineEvent(EventKind.MESSAGE, agent="engineer", content="held")],
            )
        assert layer.sent == []  # nothing sent from the writing thread
        assert Event.objects.filter(session=session, content="held").exists()  # but committed
        claim_note = notes[0][2]
        assert callable(claim_note)  # the claim's fragment is made only when sent
        prepared = services.prepare_announcements(notes)
        async_to_sync(services.send_announcements)(prepared)
        group, owner = session_group(session.pk), owner_group(alice.pk)
        assert [(target, message["type"]) for _, target, message in layer.sent] == [
            (group, "session.event"), (owner, "session.status"), (group, "session.event"),
        ]
        running, message = layer.sent[0][2], layer.sent[2][2]
        assert (running["first"], running["seq"], message["first"]) == (2, 2, 3)
        assert 'data-kind="status"' in running["html"] and "held" in message["html"]

    def test_without_holding_nothing_changes_for_other_writers(self, alice, monkeypatch):
        layer = self.Layer()
        monkeypatch.setattr(services, "get_channel_layer", lambda: layer)
        session = services.session_start(owner=alice, task="Direct", mode="one_shot")
        layer.sent.clear()
        services.run_claim(worker_id="w1", lease_seconds=30)
        assert [message["type"] for _, _, message in layer.sent] == ["session.event", "session.status"]
        assert "html" in layer.sent[0][2]
