"""Site-wide views: health check and the one-time login link."""
from __future__ import annotations

import logging
import re

from django.contrib.auth import get_user_model, login
from django.contrib.auth.tokens import default_token_generator
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.utils.encoding import force_str
from django.utils.http import urlsafe_base64_decode
from django.views.debug import SafeExceptionReporterFilter
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


class SecretSettingsFilter(SafeExceptionReporterFilter):
    """Also hide settings that hold URLs (``REDIS_URL``, ``DATABASE_URL``) or the channel layers' hosts."""

    hidden_settings = re.compile("API|TOKEN|KEY|SECRET|PASS|SIGNATURE|URL|CHANNEL_LAYERS|DATABASES", flags=re.I)


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """A 400 that says what was wrong: a body or a form too large, or a request the server could not read."""
    from django.conf import settings

    if isinstance(exception, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE / (1024 * 1024)
        message = f"The request is too large: the server accepts at most {limit:.1f} MB of form data. Shorten the text and try again."
    elif isinstance(exception, (TooManyFieldsSent, TooManyFilesSent)):
        message = "The request has too many fields for the server to read."
    elif type(exception).__name__ == "NulInRequest":
        message = "The address holds a NUL character, which no page here accepts."
    else:
        message = "The server could not read this request."
    if request.headers.get("HX-Request"):
        return render(request, "sessions/action_error.html", {"message": message}, status=400)
    return render(request, "400.html", {"message": message}, status=400)

