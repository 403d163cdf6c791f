from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView

from cmbagent_site import views

handler400 = "cmbagent_site.views.bad_request"

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="sessions:list", permanent=False)),
    path("sessions/", include("sessions.urls")),
    path("approvals/", include("approvals.urls")),
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("login/once/<str:uidb64>/<str:token>/", views.login_link, name="login-link"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", views.healthz, name="healthz"),
    path("admin/", admin.site.urls),
]
if settings.DIAGNOSTICS:  # off by default; only for loopback clients even when on
    from cmbagent_site.diagnostics import diagnostics

    urlpatterns.append(path("_diagnostics/", diagnostics, name="diagnostics"))
