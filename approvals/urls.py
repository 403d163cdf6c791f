from __future__ import annotations

from django.urls import path

from approvals import views

app_name = "approvals"

urlpatterns = [
    path("", views.queue, name="queue"),
    path("<uuid:request_id>/decide/", views.decide, name="decide"),
]
