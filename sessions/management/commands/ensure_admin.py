"""Make sure a local admin account exists, and print a way in.

A new account gets a random password, printed once. Every call also prints a
one-time login link, so a forgotten password never blocks local use.
"""
from __future__ import annotations

import secrets

from django.contrib.auth import get_user_model
from django.contrib.auth.tokens import default_token_generator
from django.core.management.base import BaseCommand
from django.urls import reverse
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode


class Command(BaseCommand):
    help = "Create the local admin account if missing and print a one-time login link."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--username", default="admin")
        parser.add_argument("--base-url", default="http://127.0.0.1:8000")

    def handle(self, *args, username: str, base_url: str, **options) -> None:
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        if user is None:
            password = secrets.token_urlsafe(12)
            user = User.objects.create_superuser(username=username, email="", password=password)
            self.stdout.write(f"Created admin account '{username}' with password: {password}")
            self.stdout.write("  (shown once; change it with: manage.py changepassword admin)")
        else:
            self.stdout.write(f"Admin account '{username}' exists.")
        uid = urlsafe_base64_encode(force_bytes(user.pk))
        token = default_token_generator.make_token(user)
        link = base_url.rstrip("/") + reverse("login-link", kwargs={"uidb64": uid, "token": token})
        self.stdout.write(f"One-time login link: {link}")
