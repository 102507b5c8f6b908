"""API authentication: a per-user bearer token for scripts, or the browser's session with its CSRF token.

Both callbacks leave the user in `request.auth`; views read it there, never from `request.user`.
"""

from django.conf import settings
from django.http import HttpRequest
from ninja.errors import AuthenticationError, HttpError
from ninja.security import APIKeyCookie, HttpBearer
from ninja.utils import check_csrf

from steering_app.models import ApiToken


class ApiTokenAuth(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str):
        user = ApiToken.user_for(token)
        if user is None:
            # A script that sends a token means to use it: a bad one must not fall back to a session.
            raise AuthenticationError(message="Invalid or revoked API token.")
        return user


class SessionCsrfAuth(APIKeyCookie):
    """Django's session login; unsafe methods also need the CSRF token (X-CSRFToken header)."""

    param_name = settings.SESSION_COOKIE_NAME

    def _get_key(self, request: HttpRequest) -> str | None:
        # Check CSRF only for a logged-in session, so that an anonymous request is a 401, not a 403.
        return request.COOKIES.get(self.param_name)

    def authenticate(self, request: HttpRequest, key: str | None):
        user = request.user
        if not user.is_authenticated:
            return None
        if check_csrf(request):
            raise HttpError(
                403, "CSRF check failed: send the csrftoken cookie's value in the X-CSRFToken header."
            )
        return user


api_auth = [ApiTokenAuth(), SessionCsrfAuth()]
