from __future__ import annotations

from django.urls import path

from sessions import views

app_name = "sessions"

urlpatterns = [
    path("", views.session_list, name="list"),
    path("new/", views.session_new, name="new"),
    path("<uuid:session_id>/", views.session_detail, name="detail"),
    path("<uuid:session_id>/continue/", views.session_action, {"action": "continue"}, name="continue"),
    path("<uuid:session_id>/events/", views.session_events, name="events"),
    path("<uuid:session_id>/export.<slug:fmt>", views.session_export, name="export"),
    path("<uuid:session_id>/files/<path:path>", views.session_file, name="file"),
    path("<uuid:session_id>/<slug:action>/", views.session_action, name="action"),
]
