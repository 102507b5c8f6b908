"""Login throttling for the login page and the admin's: after too many failures, refuse for a while.

Failures are counted in Django's cache (shared through Redis when REDIS_URL is set; per process otherwise)
twice: per username at a client address, and per address. STEERLAB_LOGIN_MAX_FAILURES failures of one
username from one address within STEERLAB_LOGIN_WINDOW_SECONDS lock that username at that address;
STEERLAB_LOGIN_MAX_ADDRESS_FAILURES failures of any usernames lock the whole address. A lab behind one NAT
shares an address: one member's mistyped passwords lock out that member only, not a colleague, while an
address that sprays guesses across many usernames is still stopped. A lock lasts the window's length and
refuses the right password too, without checking it. A successful login forgets its username's failures at
that address only: the address keeps its count, so one good account does not reset guessing at others.
"""

import hashlib
import math
import time

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from django.core.exceptions import ValidationError

KEY_PREFIX = "steerlab:login-failures:"


def now() -> float:
    return time.time()


def client_address(request) -> str:
    # REMOTE_ADDR only: X-Forwarded-For is whatever the client writes unless a trusted proxy rewrites it.
    return (request.META.get("REMOTE_ADDR") or "unknown") if request is not None else "unknown"


class LoginThrottle:
    def __init__(self, username: str, address: str):
        # A NUL cannot occur in an address, so no username/address pair is spelled like another one.
        self.user_key = self._key("user-at-address", username.casefold() + "\0" + address)
        self.address_key = self._key("address", address)

    @staticmethod
    def _key(kind: str, value: str) -> str:
        return KEY_PREFIX + kind + ":" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()

    def seconds_locked(self) -> float:
        """How long logins stay refused for this username or address; 0 when they are allowed."""
        moment = now()
        return max(
            (state.get("locked_until", 0) - moment for state in cache.get_many(self._keys()).values()),
            default=0,
        )

    def record_failure(self) -> None:
        moment, window = now(), settings.STEERLAB_LOGIN_WINDOW_SECONDS
        states = cache.get_many(self._keys())
        for key, limit in self._limits().items():
            state = states.get(key, {})
            failures = [t for t in state.get("failures", []) if t > moment - window] + [moment]
            if len(failures) >= limit:
                state = {"failures": [], "locked_until": moment + window}
            else:
                state = {"failures": failures, "locked_until": state.get("locked_until", 0)}
            cache.set(key, state, timeout=2 * window)

    def forget_user(self) -> None:
        cache.delete(self.user_key)

    def _keys(self) -> list[str]:
        return list(self._limits())

    def _limits(self) -> dict[str, int]:
        return {
            self.user_key: settings.STEERLAB_LOGIN_MAX_FAILURES,
            self.address_key: settings.STEERLAB_LOGIN_MAX_ADDRESS_FAILURES,
        }


class ThrottledLoginMixin:
    """For AuthenticationForm subclasses: refuse while throttled, count failed passwords."""

    throttled = False

    def clean(self):
        throttle = LoginThrottle(self.cleaned_data.get("username") or "", client_address(self.request))
        wait = throttle.seconds_locked()
        if wait > 0:
            self.throttled = True
            raise ValidationError(
                "Too many failed logins for this account or from this address. "
                "Try again in %(minutes)d minutes.",
                code="throttled",
                params={"minutes": math.ceil(wait / 60)},
            )
        try:
            cleaned = super().clean()
        except ValidationError:
            if self.user_cache is None:  # a wrong password, not an inactive or non-staff account
                throttle.record_failure()
            raise
        if self.user_cache is not None:
            throttle.forget_user()
        return cleaned


class ThrottledAuthenticationForm(ThrottledLoginMixin, AuthenticationForm):
    pass


class ThrottledAdminAuthenticationForm(ThrottledLoginMixin, AdminAuthenticationForm):
    pass
