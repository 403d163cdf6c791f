"""Run a task in the terminal: the same session, worker and engine as the web app."""
from __future__ import annotations

import sys

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from orchestrator.api import execute
from orchestrator.engine.hitl import OPTION_LABELS, Answer, Request
from sessions import selectors, services
from sessions.models import Event, Session

MAX_AUTO_CONTINUES = 20


class Command(BaseCommand):
    stealth_options = ("stdin",)  # where answers are read from (tests pass a file)
    help = (
        "Run a task with the agent team in this terminal, printing the conversation as it happens. "
        "Approval requests are asked at the prompt, or answered with the approving default by --auto-approve."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("task")
        parser.add_argument("--mode", default="planning_and_control", choices=Session.Mode.values)
        parser.add_argument("--user", default="", help="owner of the session (default: the first superuser)")
        parser.add_argument("--max-turns", type=int, default=None, help="round budget; the run pauses when it is spent")
        parser.add_argument("--approve-code", action="store_true", help="ask before the executor runs any code")
        parser.add_argument("--approve-errors", action="store_true", help="ask what to do when code fails")
        parser.add_argument(
            "--auto-approve",
            action="store_true",
            help=f"answer every request with its approving default and continue spent budgets (at most {MAX_AUTO_CONTINUES} times)",
        )

    def handle(self, *args, task: str, mode: str, user: str, max_turns: int | None, auto_approve: bool, **options) -> None:
        User = get_user_model()
        owner = (User.objects.filter(username=user) if user else User.objects.filter(is_superuser=True)).order_by("pk").first()
        if owner is None:
            raise CommandError(f"No user {user!r}." if user else "No superuser: run `manage.py ensure_admin` first.")
        config: dict = {"max_turns": max_turns} if max_turns else {}
        if options["approve_code"]:
            config["approve_code"] = True
        if options["approve_errors"]:
            config["approve_errors"] = True
        self.stdin = options.get("stdin") or sys.stdin
        # Without a terminal (and without --auto-approve) the command stops at the first question.
        self.interactive = options.get("stdin") is not None or self.stdin.isatty()
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

        continues = 0
        try:
            execute(session.pk, observer=show)
            while True:
                session.refresh_from_db()
                if session.status == Session.Status.WAITING_APPROVAL:
                    answer = self._answer(session, auto_approve)
                    if answer is None:
                        break
                    services.session_answer(session_id=session.pk, user=owner, answer=answer, door="terminal")
                elif session.status == Session.Status.PAUSED and self._continue(auto_approve, continues):
                    continues += 1
                    services.session_continue(session_id=session.pk, user=owner, door="terminal")
                else:
                    break
                execute(session.pk, observer=show)
        except services.SessionError as exc:
            raise CommandError(str(exc)) from exc
        session.refresh_from_db()
        self.stdout.write(f"\nSession {session.pk} ended: {session.status} ({session.last_seq} events, {session.total_tokens:,} tokens)")
        if session.status == Session.Status.FAILED:
            raise CommandError(session.runs.order_by("-number").first().error or "The run failed.")

    # --- questions at the prompt ------------------------------------------------

    def _ask(self, prompt: str) -> str | None:
        self.stdout.write(prompt, ending="")
        self.stdout.flush()
        line = self.stdin.readline()
        return None if line == "" else line.rstrip("\n")

    def _continue(self, auto_approve: bool, continues: int) -> bool:
        if auto_approve:
            return continues < MAX_AUTO_CONTINUES
        if not self.interactive:
            return False
        reply = self._ask("\nThe round budget is spent. Continue with a fresh budget? [y/N] ")
        return (reply or "").strip().lower() in ("y", "yes")

    def _answer(self, session: Session, auto_approve: bool) -> Answer | None:
        from orchestrator.engine.hitl import open_request

        request = open_request(selectors.engine_history(session.pk))
        if request is None:
            return None
        kind = Request(request.data["request"])
        options = request.data["options"]
        self.stdout.write(f"\n\n?? {request.content}")
        for step in request.data.get("plan", []):
            self.stdout.write(f"     {step['number']}. [{step['agent']}] {step['description']}")
        if request.data.get("code"):
            self.stdout.write("     " + request.data["code"].strip().replace("\n", "\n     "))
        if request.data.get("error"):
            self.stdout.write("     " + request.data["error"].strip()[-600:].replace("\n", "\n     "))
        if auto_approve:
            self.stdout.write(f"   → {OPTION_LABELS[kind.default]} (--auto-approve)")
            return Answer(kind.default, by="run_task --auto-approve")
        if not self.interactive:
            self.stdout.write("   No terminal to ask at; the session waits (answer it in the web app, or use --auto-approve).")
            return None
        while True:
            choice = self._ask(f"   Answer [{'/'.join(options)}] ({kind.default}): ")
            if choice is None:
                return None
            choice = choice.strip() or kind.default
            if choice in options:
                break
            self.stdout.write(f"   Choose one of: {', '.join(options)}.")
        edits: dict = {}
        if choice == "edit" and kind == Request.PLAN:
            self.stdout.write("   The new plan, one step per line as '[agent] what it does'; an empty line ends it:")
            steps = []
            while (line := self._ask("   > ")) not in (None, ""):
                agent, _, description = line.partition("]")
                steps.append({"agent": agent.strip(" ["), "description": description.strip()} if _ else {"description": line})
            edits["steps"] = steps
        elif choice == "edit" and kind == Request.CODE:
            self.stdout.write("   The code to run instead; a line with a single '.' ends it:")
            lines = []
            while (line := self._ask("   > ")) not in (None, "."):
                lines.append(line)
            edits["code"] = "\n".join(lines)
        label = "Your next request" if choice == "reply" else "Feedback (optional)"
        feedback = "" if choice in ("finish",) else (self._ask(f"   {label}: ") or "")
        return Answer(choice, feedback=feedback, edits=edits, by="run_task")
