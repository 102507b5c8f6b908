from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import include, path, re_path
from django.views.generic import RedirectView

from steerproject.api import api, not_found
from steerproject.login_throttle import ThrottledAdminAuthenticationForm, ThrottledAuthenticationForm

admin.site.login_form = ThrottledAdminAuthenticationForm

urlpatterns = [
    path("", RedirectView.as_view(url="/steering/", permanent=False)),
    # Pages that link no icon (the admin's) make browsers ask for /favicon.ico: the site's one icon, not a 404.
    path("favicon.ico", RedirectView.as_view(url=static("favicon.svg"), permanent=False)),
    path(
        "login/", auth_views.LoginView.as_view(authentication_form=ThrottledAuthenticationForm), name="login"
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    # The API's own root is a bare 404 page in ninja; it and every unknown path under it answer JSON.
    path("api/", not_found),
    path("api/", api.urls),
    re_path(r"^api/(?P<unmatched>.*)$", not_found),
    path("steering/", include("steering_app.urls")),
    path("presets/", include("presets_app.urls")),
]
