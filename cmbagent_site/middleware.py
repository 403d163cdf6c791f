"""Request checks that apply to every route."""
from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse


class RefuseNulMiddleware:
    """A NUL character in the path or the query string is refused with a clear 400.

    PostgreSQL cannot compare text with NUL in it: a filter such as the
    admin's ``?status=%00`` would otherwise end in a database error (a 500).
    Forms refuse NUL themselves (Django's CharField does).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if "\x00" in request.path or any("\x00" in key or any("\x00" in v for v in values) for key, values in request.GET.lists()):
            from cmbagent_site.views import bad_request

            return bad_request(request, NulInRequest())
        return self.get_response(request)


class NulInRequest(ValueError):
    """The request's path or query string holds a NUL character."""
