from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView

from steerproject.api import api

urlpatterns = [
    path("", RedirectView.as_view(url="/steering/", permanent=False)),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/", api.urls),
    path("steering/", include("steering_app.urls")),
    path("presets/", include("presets_app.urls")),
]
