"""Writes on sessions, runs, events and saved state.

Every write that other processes must hear about is announced on the channel
layer *after* its transaction commits, as a small note ("seq N is ready");
listeners read the rows themselves, so a dropped note loses nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import Exists, F, Q
from django.utils import timezone

from orchestrator.engine import hitl
from orchestrator.engine.events import EngineEvent, EventKind
from sessions.fragments import NOTE_HTML_LIMIT, render_push
from sessions.groups import WORKER_CHANNEL, owner_group, session_group
from sessions.models import Event, Run, Session, SessionState

logger = logging.getLogger(__name__)

HISTORY_TAIL = 50  # messages kept in SessionState.conversation_history


class StateConflictError(RuntimeError):
    """The session state kept changing under us: the save was not applied."""


class LeaseLostError(RuntimeError):
    """The worker writing a run's events no longer holds its lease: another worker does."""


class SessionError(ValueError):
    """A request on a session that cannot be carried out; the message says why."""


# --- announcements ----------------------------------------------------------


# An announcement: ("group" or "channel", its name, the message). The message may be a callable that
# makes it (a fragment rendered only when it is sent).
Note = tuple[str, str, "dict[str, Any] | Callable[[], dict[str, Any]]"]

_held = threading.local()


@contextlib.contextmanager
def announcements_held() -> Iterator[list[Note]]:
    """Within this block, the announcements this thread makes are kept in the list it yields, not sent.

    The worker writes on one database thread. Sending from there made every
    write wait for the channel layer (a hop to the event loop, then Redis)
    before the next write could start. The worker sends what is kept itself,
    in order, with :func:`send_announcements` (after :func:`prepare_announcements`
    on the database thread if any message is still to be made).
    """
    kept: list[Note] = []
    outer = getattr(_held, "notes", None)
    _held.notes = kept
    try:
        yield kept
    finally:
        _held.notes = outer


def prepare_announcements(notes: Sequence[Note]) -> list[Note]:
    """``notes`` with every message made (a database read and a render, for some)."""
    return [(kind, target, message() if callable(message) else message) for kind, target, message in notes]


async def send_announcements(notes: Sequence[Note]) -> None:
    """Send ``notes`` (prepared) on the channel layer, in order; a failed send is logged and skipped."""
    layer = get_channel_layer()
    if layer is None:
        return
    for kind, target, message in notes:
        try:
            if kind == "group":
                await layer.group_send(target, message)
            else:
                await layer.send(target, message)
        except Exception:  # noqa: BLE001 - the rows are written; listeners catch up from them
            logger.warning("could not announce %s to %s", message.get("type"), target, exc_info=True)


def _send(kind: str, target: str, message: dict[str, Any]) -> None:
    kept = getattr(_held, "notes", None)
    if kept is not None:
        kept.append((kind, target, message))
    elif get_channel_layer() is not None:
        try:
            async_to_sync(send_announcements)([(kind, target, message)])
        except Exception:  # noqa: BLE001 - the rows are written; listeners catch up from them
            logger.warning("could not announce %s to %s", message.get("type"), target, exc_info=True)


def _send_made(kind: str, target: str, make: Callable[[], dict[str, Any]]) -> None:
    """:func:`_send` of the message ``make`` makes, made only when it is sent (kept unmade while held)."""
    kept = getattr(_held, "notes", None)
    if kept is not None:
        kept.append((kind, target, make))
    else:
        _send(kind, target, make())


def _announce_events(rows: Sequence[Event], *, render_now: bool = False, session: Session | None = None) -> None:
    """After commit, tell the session's sockets that ``rows`` (consecutive seqs) are ready, rendered once for all.

    The fragment is rendered once, for every socket watching: a socket whose
    cursor is just before the first seq sends it as it is; any other reads the
    rows itself, so the note is a shortcut, never the truth. With
    ``render_now`` it is rendered at once, inside the writing transaction,
    which must have made all its changes to the session by then: the fragment
    then shows exactly what commits, and after the commit only the send is
    left. Otherwise it is rendered after the commit. ``session``: the session (with its state) as the writing
    transaction leaves it, rendered from as it is instead of being read again.
    """
    if render_now:
        note = _event_note(rows, session)
        transaction.on_commit(lambda: _send("group", session_group(rows[0].session_id), note))
    else:
        transaction.on_commit(lambda: _send_made("group", session_group(rows[0].session_id), lambda: _event_note(rows)))


def _event_note(rows: Sequence[Event], session: Session | None = None) -> dict[str, Any]:
    """The "seq N is ready" note for ``rows``, with their fragment when it renders and is small enough."""
    note: dict[str, Any] = {"type": "session.event", "first": rows[0].seq, "seq": rows[-1].seq}
    try:
        if session is None:
            # Not the state's conversation tail (up to HISTORY_TAIL long messages): no push shows it, and
            # decoding it for every announce cost more than rendering the events.
            session = Session.objects.select_related("state").defer("state__conversation_history").get(pk=rows[0].session_id)
        html = render_push(session, rows)
    except Exception as exc:  # noqa: BLE001 - listeners fall back to reading the rows
        if isinstance(exc, DatabaseError) and transaction.get_connection().in_atomic_block:
            raise  # the writing transaction is broken: it must fail, not commit without its rows
        logger.warning("could not render events %s-%s of session %s", rows[0].seq, rows[-1].seq, rows[0].session_id, exc_info=True)
    else:
        if len(html) <= NOTE_HTML_LIMIT:
            note["html"] = html
    return note


def worker_wake() -> None:
    """Tell the workers there is a run to claim (after the current transaction commits)."""
    transaction.on_commit(lambda: _send("channel", WORKER_CHANNEL, {"type": "run.wake"}))


# --- state ------------------------------------------------------------------


def storable(value: Any) -> Any:
    """``value`` as every database keeps it: NUL, which PostgreSQL refuses in text and JSON, becomes U+FFFD.

    Agent output, code output and tasks from the API may carry NUL; a run must
    not fail on PostgreSQL for what it can store on SQLite.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    return value


def _read_version(session_id: UUID | str) -> int:
    return SessionState.objects.filter(session_id=session_id).values_list("version", flat=True).get()


def save_session_state(
    session_id: UUID | str,
    *,
    conversation_history: Sequence[dict[str, Any]],
    context_variables: dict[str, Any],
    current_phase: str,
    current_step: int,
    plan: list[dict[str, Any]] | None = None,
    engine_state: dict[str, Any] | None = None,
    state: SessionState | None = None,
) -> int:
    """Save a session's engine state and return its new version.

    Optimistic locking: the row is updated only if its version is still the one
    read. A conflict (another writer got in between) is retried once with the
    version read again; a second conflict raises StateConflictError and
    nothing is written.

    ``state``: the row as the caller read it (its version is then the one
    tried first, which saves a query); it is given what was saved. If the row
    changed since it was read, it is read again before the retry, so that it
    never holds a field older than the one committed.
    """
    fields: dict[str, Any] = {
        "conversation_history": storable(list(conversation_history)[-HISTORY_TAIL:]),
        "context_variables": storable(context_variables),
        "current_phase": storable(current_phase),
        "current_step": current_step,
        "updated_at": timezone.now(),
    }
    if plan is not None:
        fields["plan"] = storable(plan)
    if engine_state is not None:
        fields["engine_state"] = storable(engine_state)
    for attempt in (1, 2):
        if state is None:
            version = _read_version(session_id)
        else:
            if attempt == 2:
                state.refresh_from_db()  # another writer's plan or engine state, which this save may not replace
            version = state.version
        updated = SessionState.objects.filter(session_id=session_id, version=version).update(
            version=F("version") + 1, **fields
        )
        if updated:
            if state is not None:
                for name, value in fields.items():
                    setattr(state, name, value)
                state.version = version + 1
            return version + 1
        logger.warning("state of session %s changed during save (attempt %d)", session_id, attempt)
    raise StateConflictError(
        f"The state of session {session_id} was changed by another writer twice during one save; "
        "the save was not applied."
    )


# --- sessions ---------------------------------------------------------------


def session_start(
    *, owner, task: str, mode: str, title: str = "", config: dict[str, Any] | None = None, model_provider: str = ""
) -> Session:
    """Create a session with its state and a queued first run, and wake a worker."""
    task, title = storable(task).strip(), storable(title)
    if not task:
        raise SessionError("The task is empty.")
    if len(task) > settings.TASK_MAX_CHARS:
        raise SessionError(f"The task is {len(task):,} characters long; the limit is {settings.TASK_MAX_CHARS:,}.")
    if mode not in Session.Mode.values:
        raise SessionError(f"Unknown mode {mode!r}; choose one of: {', '.join(Session.Mode.values)}.")
    title = (title.strip() or " ".join(task.split())[:80]).strip()
    with transaction.atomic():
        _check_live_limit(owner)
        session = Session.objects.create(
            owner=owner,
            task=task,
            mode=mode,
            title=title[:200],
            config=config or {},
            model_provider=model_provider or os.environ.get("CMBAGENT_MODEL_PROVIDER", "offline"),
        )
        SessionState.objects.create(session=session)
        run = Run.objects.create(session=session, number=1)
        # No socket can be on a session that does not exist until this commits: its page reads this
        # event from the database, so it is not rendered and announced here (the Start button waits
        # on that). The owner's session list is still told of the new session.
        worker_wake()  # first: the workers' wake-up starts the run; the session list can hear of it after
        # No other transaction can see the new session: no lock to take, and the object is kept up to date.
        _write_events(session, run_id=run.pk, events=[_status_event("queued", "Waiting for a worker.")], announce=False)
    logger.info("session %s started by user %s in mode %s", session.pk, owner.pk, mode)
    return session


def _check_live_limit(user) -> None:
    """Refuse one more live run for a user who already has the most allowed (queued or running)."""
    limit = settings.MAX_LIVE_RUNS_PER_USER
    if not limit:
        return
    live = Session.objects.filter(owner=user, status__in=[Session.Status.QUEUED, Session.Status.RUNNING]).count()
    if live >= limit:
        raise SessionError(
            f"You have {live} sessions queued or running, the most allowed at once ({limit}). "
            "Wait for one to finish, or suspend or cancel one."
        )


def _status_event(status: str, detail: str = "") -> EngineEvent:
    return EngineEvent(EventKind.STATUS, content=detail, data={"status": status})


def _append(session_id: UUID | str, *, run_id: int | None, event: EngineEvent, worker_id: str = "", announce: bool = True) -> Event:
    """Write one event: :func:`_write_events` with one."""
    return _write_events(session_id, run_id=run_id, events=[event], worker_id=worker_id, announce=announce)[1][0]


def _write_events(
    session: Session | UUID | str, *, run_id: int | None, events: Sequence[EngineEvent], worker_id: str = "",
    announce: bool = True, with_state: bool = False,
) -> tuple[Session, list[Event]]:
    """Allocate the next seqs under the session row's lock and write the events, in order; return the
    session, as it is once they are written, and their rows.

    Must run inside a transaction. Applies the events' effect on the session
    (status, token totals) in the same transaction. With ``worker_id``, the
    write is fenced: it fails with :class:`LeaseLostError` unless that worker
    still holds the run's lease, so a worker presumed dead cannot add to a
    log another worker has taken over. ``session``: its id, or a session this
    transaction created (no other can see it, so it is not locked or read
    again). ``with_state``: the session's state is read with it (without its
    conversation tail), as ``session.state``.
    """
    if isinstance(session, Session):
        session_id = session.pk
    else:
        session_id = session
        locked = Session.objects.select_for_update(of=("self",))
        if with_state:
            locked = locked.select_related("state").defer("state__conversation_history")
        session = locked.get(pk=session_id)
    seq = session.last_seq
    changes: dict[str, Any] = {"updated_at": timezone.now()}
    usage: dict[str, Any] | None = None
    prompt = completion = 0
    total_cost = Decimal(0)
    rows: list[Event] = []
    for event in events:
        seq += 1
        if event.kind == EventKind.STATUS:
            changes["status"] = event.data["status"]
        cost = Decimal(str(round(event.cost_usd, 6)))
        if event.prompt_tokens or event.completion_tokens:
            prompt += event.prompt_tokens
            completion += event.completion_tokens
            total_cost += cost
            usage = dict(session.usage or {}) if usage is None else usage
            agent = storable(event.agent) or "(unnamed)"
            mine = dict(usage.get(agent, {}))
            mine["prompt"] = mine.get("prompt", 0) + event.prompt_tokens
            mine["completion"] = mine.get("completion", 0) + event.completion_tokens
            mine["cost"] = round(mine.get("cost", 0.0) + float(cost), 6)
            usage[agent] = mine
        rows.append(
            Event(
                session_id=session_id,
                run_id=run_id,
                seq=seq,
                kind=str(event.kind),
                agent=storable(event.agent),
                content=storable(event.content),
                data=storable(event.data),
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                cost_usd=cost,
            )
        )
    changes["last_seq"] = seq
    if usage is not None:
        # Sums, not F() expressions: the row is locked, and the session then holds what is written.
        changes["prompt_tokens"] = session.prompt_tokens + prompt
        changes["completion_tokens"] = session.completion_tokens + completion
        changes["cost_usd"] = session.cost_usd + total_cost
        changes["usage"] = usage
    # The fence is in the update: a statement of its own, after the lock, so it sees a takeover committed meanwhile.
    fenced = Session.objects.filter(pk=session_id)
    if worker_id:
        fenced = fenced.filter(Exists(Run.objects.filter(pk=run_id, lease_owner=worker_id, status=Run.Status.RUNNING)))
    if not fenced.update(**changes):
        raise LeaseLostError(f"Worker {worker_id} no longer holds run {run_id}.")
    for name, value in changes.items():
        setattr(session, name, value)
    if len(rows) == 1:
        rows[0].save(force_insert=True)
    else:
        Event.objects.bulk_create(rows)
    if announce:
        _announce_events(rows)
    if "status" in changes:
        note = {"type": "session.status", "session": str(session_id), "status": changes["status"], "last_seq": seq}
        owner_id = session.owner_id
        transaction.on_commit(lambda: _send("group", owner_group(owner_id), note))
    return session, rows


def event_append(
    *,
    session_id: UUID | str,
    run_id: int | None,
    event: EngineEvent,
    checkpoint: dict[str, Any] | None = None,
    conversation_tail: Sequence[dict[str, Any]] | None = None,
    worker_id: str = "",
) -> Event:
    """Write one engine event and, with it, the state checkpoint: one transaction (fenced by ``worker_id``)."""
    return events_append(
        session_id=session_id, run_id=run_id, events=[event], checkpoint=checkpoint,
        conversation_tail=conversation_tail, worker_id=worker_id,
    )[0]


def events_append(
    *,
    session_id: UUID | str,
    run_id: int | None,
    events: Sequence[EngineEvent],
    checkpoint: dict[str, Any] | None = None,
    conversation_tail: Sequence[dict[str, Any]] | None = None,
    worker_id: str = "",
) -> list[Event]:
    """Write engine events in order and, with them, the state checkpoint taken after the last: one
    transaction (fenced by ``worker_id``), announced once after commit.

    A worker writes whatever its run produced while the previous write was
    committing, so under load one transaction carries many events; either all
    of them and the checkpoint are stored, or none.
    """
    with transaction.atomic():
        session, rows = _write_events(session_id, run_id=run_id, events=events, worker_id=worker_id, announce=False, with_state=True)
        for row in rows:
            if row.kind == EventKind.APPROVAL:
                from approvals.services import record_request

                record_request(row)
        if checkpoint is not None:
            save_session_state(
                session_id,
                conversation_history=conversation_tail or [],
                context_variables=checkpoint.get("context_variables", {}),
                current_phase=checkpoint.get("phase", ""),
                current_step=checkpoint.get("step", 0),
                plan=checkpoint.get("plan"),
                engine_state={k: v for k, v in checkpoint.items() if k not in {"plan", "context_variables"}},
                state=getattr(session, "state", None),
            )
        # Rendered now, with the checkpoint's phase, step and plan in place; sent once committed. From the session
        # and state as this write leaves them when it saved the state (the state read with the lock may predate a
        # writer this write waited for: the save then read it again); else read afresh.
        _announce_events(rows, render_now=True, session=session if checkpoint is not None else None)
    return rows


def _locked_session(session_id: UUID | str, user) -> Session:
    session = Session.objects.select_for_update().filter(pk=session_id, owner=user).first()
    if session is None:
        raise SessionError("No such session.")
    return session


def _check_resumable(session: Session) -> None:
    """Raise SessionError, with the cause, if the session cannot go on from its saved state."""
    from orchestrator.engine.models import ModelConfig, ModelConfigError, check_reachable, client_factory
    from sessions import selectors

    state = SessionState.objects.filter(session=session).first()
    if state is None:
        raise SessionError("The saved state of this session is missing; it cannot be resumed.")
    if not isinstance(state.engine_state, dict) or not isinstance(state.plan, list) or not isinstance(state.context_variables, dict):
        raise SessionError("The saved state of this session is unreadable (it is not the shape the engine writes).")
    try:
        selectors.engine_history(session.pk)
    except (ValueError, TypeError, KeyError) as exc:
        raise SessionError(f"The event log of this session is unreadable: {exc}") from exc
    try:
        model = ModelConfig.from_env(provider=session.model_provider)
        client_factory(model)  # a missing key or a bad override fails here, before the network
        async_to_sync(check_reachable)(model)
    except ModelConfigError as exc:
        raise SessionError(f"The model cannot be used: {exc}") from exc


def _queue_next(session: Session, detail: str, *, note: dict[str, Any] | None = None, **fields: Any) -> Run:
    """Create the session's next run, queued, with its status event (``note``: extra event data), and wake a worker."""
    run = Run.objects.create(session=session, number=session.runs.count() + 1, **fields)
    event = EngineEvent(EventKind.STATUS, content=detail, data={"status": "queued", **(note or {})})
    _append(session.pk, run_id=run.pk, event=event)
    worker_wake()
    return run


def _go_on(session_id: UUID | str, user, *, required: str, verb: str, detail: str) -> Run:
    """Queue the next run of a session in the ``required`` status, after checking it can go on from its state."""
    with transaction.atomic():
        session = _locked_session(session_id, user)
        if session.status != required:
            label = Session.Status(required).label.lower()
            raise SessionError(f"Only a {label} session can be {verb}; this one is {session.get_status_display().lower()}.")
        _check_live_limit(user)
        _check_resumable(session)
        run = _queue_next(session, detail)
    logger.info("session %s %s by user %s (run %d)", session.pk, verb, user.pk, run.number)
    return run


def session_continue(*, session_id: UUID | str, user, door: str = "session_page") -> Run:
    """Queue the next run of a paused session: same state, a fresh round budget.

    A spent budget is an approval request like any other, so Continue answers
    it through the approval service (one winner, audited). A session paused
    before budgets were requests has none and is continued directly.
    """
    from approvals.models import ApprovalRequest

    pending = ApprovalRequest.objects.filter(session_id=session_id, kind=hitl.Request.BUDGET, status=ApprovalRequest.Status.PENDING)
    if pending.exists():
        return session_answer(session_id=session_id, user=user, answer=hitl.Answer("continue"), door=door)
    return _go_on(session_id, user, required=Session.Status.PAUSED, verb="continued", detail="Continuing with a fresh round budget.")


def session_resume(*, session_id: UUID | str, user) -> Run:
    """Queue a suspended session's next run; it goes on from the saved state, not from the start."""
    return _go_on(session_id, user, required=Session.Status.SUSPENDED, verb="resumed", detail="Resuming from the saved state.")


def session_retry(*, session_id: UUID | str, user) -> Run:
    """Queue a failed session's next run, from its last saved event."""
    return _go_on(session_id, user, required=Session.Status.FAILED, verb="retried", detail="Retrying from the last saved event.")


def _stop(session_id: UUID | str, user, outcome: str) -> Session:
    """Cancel or suspend: a running run is stopped by its worker; anything else at once."""
    verb = "cancelled" if outcome == Run.Status.CANCELLED else "suspended"
    stoppable = {
        Run.Status.CANCELLED: {
            Session.Status.QUEUED, Session.Status.RUNNING, Session.Status.PAUSED,
            Session.Status.WAITING_APPROVAL, Session.Status.SUSPENDED, Session.Status.FAILED,
        },
        Run.Status.SUSPENDED: {Session.Status.QUEUED, Session.Status.RUNNING},
    }[outcome]
    with transaction.atomic():
        session = _locked_session(session_id, user)
        if session.status not in stoppable:
            raise SessionError(f"A {session.get_status_display().lower()} session cannot be {verb}.")
        run = session.runs.select_for_update().order_by("-number").first()
        if run is not None and run.status == Run.Status.RUNNING:
            # Its worker polls for this and ends the run's process within a second.
            run.stop_request = outcome
            run.save(update_fields=["stop_request"])
        else:
            if run is not None and run.status == Run.Status.QUEUED:
                run.status = outcome
                run.finished_at = timezone.now() if outcome == Run.Status.CANCELLED else None
                run.save(update_fields=["status", "finished_at"])
            by = user.get_username()
            _append(session.pk, run_id=run.pk if run else None, event=_status_event(outcome, f"{verb.capitalize()} by {by}."))
            if outcome == Run.Status.CANCELLED:
                from approvals.services import cancel_pending_of

                cancel_pending_of(session.pk, reason=f"the session was cancelled by {by}")
    logger.info("session %s: user %s asked for %s", session.pk, user.pk, outcome)
    return session


def session_cancel(*, session_id: UUID | str, user) -> Session:
    return _stop(session_id, user, Run.Status.CANCELLED)


def session_suspend(*, session_id: UUID | str, user) -> Session:
    return _stop(session_id, user, Run.Status.SUSPENDED)


def queue_answer(session_id: UUID | str, answer: hitl.Answer, *, request_id: str = "", door: str = "") -> Run | None:
    """Queue the run that applies a decided answer (called by the approval service, in its transaction).

    None when the run that asked is still ending: it applies the decision as it finishes.
    """
    from sessions import selectors  # selectors import models only; kept local to avoid a cycle at import

    session = Session.objects.select_for_update().get(pk=session_id)
    request = hitl.open_request(selectors.engine_history(session.pk))
    if request is None:
        raise SessionError(f"This session is not waiting for an answer; it is {session.get_status_display().lower()}.")
    budget = hitl.is_budget(request)
    if session.status == Session.Status.RUNNING:
        # The request is the last thing the run wrote and its run is ending: the
        # decision stands (the caller records it) and is applied as that run finishes.
        try:
            hitl.validate(request, answer)
        except hitl.AnswerError as exc:
            raise SessionError(str(exc)) from exc
        return None
    if session.status != (Session.Status.PAUSED if budget else Session.Status.WAITING_APPROVAL):
        raise SessionError(f"This session is not waiting for an answer; it is {session.get_status_display().lower()}.")
    return _queue_answer_now(session, request, answer, request_id=request_id, door=door)


def _queue_answer_now(session: Session, request: EngineEvent, answer: hitl.Answer, *, request_id: str, door: str) -> Run:
    budget = hitl.is_budget(request)
    if budget and answer.decision == "continue":
        _check_resumable(session)  # as Continue always did: a broken state or model is refused, with its cause
    try:
        checked = hitl.validate(request, answer)
    except hitl.AnswerError as exc:
        raise SessionError(str(exc)) from exc
    checked = hitl.Answer(checked.decision, checked.feedback, checked.edits, by=answer.by)
    label = hitl.OPTION_LABELS.get(checked.decision, checked.decision)
    ends = checked.decision in ("abort", "stop")
    detail = f"{label} ({answer.by}): {'the run ends' if ends else 'the team goes on'}."
    return _queue_next(session, detail, note={"decided": request_id, "door": door}, answer=checked.to_dict())


def session_answer(*, session_id: UUID | str, user, answer: hitl.Answer, door: str = "session_page") -> Run:
    """The owner (or staff) answers the request the session waits on, through the approval service."""
    from approvals import services as approvals
    from approvals.models import ApprovalRequest

    request = ApprovalRequest.objects.filter(session_id=session_id, status=ApprovalRequest.Status.PENDING).order_by("-event_seq").first()
    if request is None:
        if not Session.objects.filter(pk=session_id, owner=user).exists():
            raise SessionError("No such session.")
        raise SessionError("This session is not waiting for an answer.")
    try:
        approvals.decide(request.pk, user=user, decision=answer.decision, feedback=answer.feedback, edits=answer.edits, door=door)
    except PermissionError as exc:
        if request.session.owner_id == getattr(user, "pk", None):
            raise SessionError("This session's requests are decided by staff with the approvals permission.") from exc
        raise SessionError("No such session.") from exc
    except approvals.ApprovalError as exc:
        raise SessionError(str(exc)) from exc
    return Run.objects.filter(session_id=session_id).latest("number")


# --- runs -------------------------------------------------------------------


def run_claim(*, worker_id: str, lease_seconds: int, run_id: int | None = None, exclude: Collection[int] = ()) -> Run | None:
    """Take the oldest queued run (or ``run_id``), or one whose worker's lease ran out.

    The run's ``lease_owner`` becomes ``<worker_id>#<claim>``, new at every
    claim: it is the fence its writes, heartbeats and finish must present, so
    an execution that lost its lease (even to its own worker) can write nothing
    more. ``exclude``: runs the caller is executing, never claimed twice.
    """
    now = timezone.now()
    with transaction.atomic():
        claimable = Run.objects.select_for_update(skip_locked=True).filter(
            Q(status=Run.Status.QUEUED) | Q(status=Run.Status.RUNNING, lease_expires_at__lt=now)
        )
        if exclude:
            claimable = claimable.exclude(pk__in=list(exclude))
        if run_id is not None:
            claimable = claimable.filter(pk=run_id)
        run = claimable.order_by("created_at").first()
        if run is None:
            return None
        if run.stop_request:
            # Its worker died after a person asked it to stop: honour the request, do not run it again.
            run.status, run.lease_owner, run.lease_expires_at = run.stop_request, "", None
            run.finished_at = now if run.status == Run.Status.CANCELLED else None
            run.save(update_fields=["status", "lease_owner", "lease_expires_at", "finished_at"])
            _append(run.session_id, run_id=run.pk, event=_status_event(run.status, "Stopped as asked; its worker had gone."))
            return run_claim(worker_id=worker_id, lease_seconds=lease_seconds, exclude=exclude) if run_id is None else None
        resumed = run.status == Run.Status.RUNNING
        run.status = Run.Status.RUNNING
        run.lease_owner = f"{worker_id}#{uuid.uuid4().hex[:8]}"
        run.lease_expires_at = now + timedelta(seconds=lease_seconds)
        run.heartbeat_at = now
        run.started_at = run.started_at or now
        run.save(update_fields=["status", "lease_owner", "lease_expires_at", "heartbeat_at", "started_at"])
        detail = "Taken over after its worker stopped." if resumed else "A worker started the run."
        # The session as the claim leaves it, kept on the run: its worker need not read it again.
        run.session = _write_events(run.session_id, run_id=run.pk, events=[_status_event("running", detail)])[0]
    logger.info("worker %s claimed run %s of session %s", worker_id, run.pk, run.session_id)
    return run


def run_stop_request(run_id: int) -> str:
    """What a person asked of a running run: "", "cancelled" or "suspended"."""
    return Run.objects.filter(pk=run_id).values_list("stop_request", flat=True).first() or ""


def run_release(*, run_id: int, worker_id: str, detail: str) -> bool:
    """Give a run back to the queue (its worker is shutting down); another worker goes on from its log."""
    with transaction.atomic():
        run = Run.objects.select_for_update().filter(pk=run_id, lease_owner=worker_id, status=Run.Status.RUNNING).first()
        if run is None:
            return False
        run.status, run.lease_owner, run.lease_expires_at = Run.Status.QUEUED, "", None
        run.save(update_fields=["status", "lease_owner", "lease_expires_at"])
        _append(run.session_id, run_id=run.pk, event=_status_event("queued", detail))
    worker_wake()
    return True


def run_reclaim_orphans(*, host: str, alive: Callable[[int], bool]) -> int:
    """Expire the leases of runs held by dead worker processes on ``host``, so they are claimed now.

    Worker ids are ``host:pid:nonce``; on the same host a missing pid means the
    worker is gone for sure, and its runs need not wait for the lease to run out.
    """
    orphans = []
    for pk, owner in Run.objects.filter(status=Run.Status.RUNNING, lease_owner__startswith=f"{host}:").values_list("pk", "lease_owner"):
        try:
            pid = int(owner.split(":")[1])
        except (IndexError, ValueError):
            continue
        if not alive(pid):
            orphans.append(pk)
    if orphans:
        Run.objects.filter(pk__in=orphans, status=Run.Status.RUNNING).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    return len(orphans)


def runs_watch(*, held: dict[int, str], lease_seconds: int, beat: bool) -> tuple[dict[int, str], set[int]]:
    """For all the runs one worker executes (run id → its claim), in two queries whatever their number:
    the stop requests people made, the runs whose lease is no longer theirs, and (``beat``) a renewed lease for the rest.
    """
    if not held:
        return {}, set()
    stops: dict[int, str] = {}
    lost: set[int] = set()
    seen: set[int] = set()
    for pk, owner, status, stop_request in Run.objects.filter(pk__in=list(held)).values_list("pk", "lease_owner", "status", "stop_request"):
        seen.add(pk)
        if owner != held[pk] or status != Run.Status.RUNNING:
            lost.add(pk)
        elif stop_request:
            stops[pk] = stop_request
    lost |= set(held) - seen  # a run that is gone altogether
    if beat:
        now = timezone.now()
        mine = Q(pk__in=[])
        for pk, owner in held.items():
            if pk not in lost:
                mine |= Q(pk=pk, lease_owner=owner)
        Run.objects.filter(mine, status=Run.Status.RUNNING).update(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
    return stops, lost


def run_heartbeat(*, run_id: int, worker_id: str, lease_seconds: int) -> bool:
    """Extend the lease; False if this worker no longer holds it."""
    now = timezone.now()
    return bool(
        Run.objects.filter(pk=run_id, lease_owner=worker_id, status=Run.Status.RUNNING).update(
            heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds)
        )
    )


def run_finish(*, run_id: int, worker_id: str, status: str, detail: str = "") -> Run:
    """End a run the worker holds, recording the outcome as a status event."""
    if status not in Run.Status.values:
        raise SessionError(f"Unknown run status {status!r}.")
    with transaction.atomic():
        run = Run.objects.select_for_update().get(pk=run_id)
        if run.lease_owner != worker_id:
            raise SessionError(f"Run {run_id} is held by {run.lease_owner or 'nobody'}, not {worker_id}.")
        run.status = status
        run.stop_request = ""
        run.error = detail if status == Run.Status.FAILED else ""
        run.finished_at = timezone.now() if status in Run.TERMINAL else None
        run.lease_owner = ""
        run.lease_expires_at = None
        run.save(update_fields=["status", "stop_request", "error", "finished_at", "lease_owner", "lease_expires_at"])
        _append(run.session_id, run_id=run.pk, event=_status_event(status, detail))
        if status in (Run.Status.WAITING_APPROVAL, Run.Status.PAUSED):
            _apply_early_decision(run.session_id)
    logger.info("run %s finished: %s %s", run_id, status, detail)
    return run


def _apply_early_decision(session_id: UUID | str) -> Run | None:
    """Queue the run for a request decided while the run that asked it was still ending (holding the session lock).

    Cheap when nothing was decided early: the newest approval event and its request, no read of the whole log.
    """
    from approvals.models import ApprovalRequest

    asked = Event.objects.filter(session_id=session_id, kind=EventKind.APPROVAL).order_by("-seq").first()
    if asked is None:
        return None
    answered = Event.objects.filter(session_id=session_id, seq__gt=asked.seq).exclude(kind__in=[EventKind.STATUS, EventKind.ERROR])
    early = (
        ApprovalRequest.objects.filter(session_id=session_id, event_seq=asked.seq, status__in=["decided", "expired"])
        .select_related("decided_by")
        .first()
    )
    if early is None or answered.exists():
        return None
    request = EngineEvent(EventKind.APPROVAL, agent=asked.agent, content=asked.content, data=asked.data)
    session = Session.objects.get(pk=session_id)
    by = early.decided_by.get_username() if early.decided_by else "timeout policy"
    answer = hitl.Answer(early.decision, early.feedback, early.edits, by=by)
    logger.info("session %s: applying %s, decided by %s while its run was ending", session_id, early.decision, by)
    try:
        return _queue_answer_now(session, request, answer, request_id=str(early.pk), door=early.door)
    except SessionError as exc:
        # The run still ends as it asked; the cause is in the log for whoever looks next.
        _append(session_id, run_id=None, event=EngineEvent(EventKind.ERROR, content=f"The decision could not be applied: {exc}"))
        return None
