"""Site-wide views: health check and the one-time login link."""
from __future__ import annotations

import logging

from django.contrib.auth import get_user_model, login
from django.contrib.auth.tokens import default_token_generator
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.utils.encoding import force_str
from django.utils.http import urlsafe_base64_decode
from django.views.decorators.http import require_GET

logger = logging.getLogger("sessions")


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - reported to the caller as unhealthy
        return JsonResponse({"status": "error", "database": str(exc)}, status=503)
    return JsonResponse({"status": "ok"})


@require_GET
def login_link(request: HttpRequest, uidb64: str, token: str) -> HttpResponse:
    """Log in through a link printed by ``manage.py ensure_admin``.

    The token is Django's password-reset token: it is bound to the user's
    last login, so it works once, and it expires (PASSWORD_RESET_TIMEOUT).
    """
    User = get_user_model()
    try:
        user = User.objects.get(pk=force_str(urlsafe_base64_decode(uidb64)))
    except (User.DoesNotExist, ValueError, TypeError, OverflowError):
        user = None
    if user is None or not user.is_active or not default_token_generator.check_token(user, token):
        logger.info("login link refused")
        return render(request, "registration/login_link_invalid.html", status=400)
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return redirect("sessions:list")
