"""``manage.py import_cmbagent_db PATH``: bring sessions, states and approval records from CMBAgent."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from approvals.legacy import LegacyError, import_database


class Command(BaseCommand):
    help = "Import a CMBAgent SQLite database (sessions, session states, both generations of approval records). Safe to run twice."

    def add_arguments(self, parser) -> None:
        parser.add_argument("path")
        parser.add_argument("--owner", default="", help="user to own the imported sessions (default: the first superuser)")

    def handle(self, *args, path: str, owner: str, **options) -> None:
        User = get_user_model()
        user = (User.objects.filter(username=owner) if owner else User.objects.filter(is_superuser=True)).order_by("pk").first()
        if user is None:
            raise CommandError(f"No user {owner!r}." if owner else "No superuser to own the sessions: pass --owner or run ensure_admin.")
        try:
            report = import_database(path, owner=user)
        except LegacyError as exc:
            raise CommandError(f"{exc} Nothing was imported.") from exc
        for what, count in report.imported.items():
            self.stdout.write(f"imported {count} {what}" + (f" ({report.already[what]} already here)" if report.already[what] else ""))
        if report.skipped:
            self.stdout.write(f"skipped {len(report.skipped)}:")
            for line in report.skipped:
                self.stdout.write(f"  - {line}")
        for line in report.notes:
            self.stdout.write(f"note: {line}")
