"""Run a task in the terminal: the same session, worker and engine as the web app."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from orchestrator.api import execute
from sessions import services
from sessions.models import Event, Session


class Command(BaseCommand):
    help = "Run a task with the agent team in this terminal, printing the conversation as it happens."

    def add_arguments(self, parser) -> None:
        parser.add_argument("task")
        parser.add_argument("--mode", default="planning_and_control", choices=Session.Mode.values)
        parser.add_argument("--user", default="", help="owner of the session (default: the first superuser)")
        parser.add_argument("--max-turns", type=int, default=None, help="round budget; the run pauses when it is spent")

    def handle(self, *args, task: str, mode: str, user: str, max_turns: int | None, **options) -> None:
        User = get_user_model()
        owner = (User.objects.filter(username=user) if user else User.objects.filter(is_superuser=True)).order_by("pk").first()
        if owner is None:
            raise CommandError(f"No user {user!r}." if user else "No superuser: run `manage.py ensure_admin` first.")
        config = {"max_turns": max_turns} if max_turns else {}
        try:
            session = services.session_start(owner=owner, task=task, mode=mode, config=config)
        except services.SessionError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Session {session.pk} ({session.get_mode_display()}, {session.model_provider} model)")
        tokens = 0

        def show(event: Event) -> None:
            nonlocal tokens
            tokens += event.prompt_tokens + event.completion_tokens
            first_line = (event.content.strip().splitlines() or [""])[0][:100]
            who = event.agent or "-"
            self.stdout.write(f"\r{event.seq:>4} {who:<15} {event.kind:<11} {first_line}")
            self.stdout.write(f"     … {event.seq} events · {tokens:,} tokens", ending="\r")
            self.stdout.flush()

        try:
            execute(session.pk, observer=show)
        except services.SessionError as exc:
            raise CommandError(str(exc)) from exc
        session.refresh_from_db()
        self.stdout.write(f"\nSession {session.pk} ended: {session.status} ({session.last_seq} events, {session.total_tokens:,} tokens)")
        if session.status == Session.Status.FAILED:
            raise CommandError(session.runs.order_by("-number").first().error or "The run failed.")
