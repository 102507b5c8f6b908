"""Login throttling on /login/ and /admin/login/: 5 failures of a username from one address lock that username
there, 20 failures of any usernames lock the address, for 15 minutes."""

import pytest
from django.test import Client

from steerproject import login_throttle

LOGIN = "/login/"
ADMIN_LOGIN = "/admin/login/"


def attempt(username: str, password: str, address: str = "10.0.0.1", url: str = LOGIN):
    client = Client(REMOTE_ADDR=address)
    response = client.post(url, {"username": username, "password": password, "next": "/steering/"})
    return response, "_auth_user_id" in client.session


def fail_five_times(username: str, address: str = "10.0.0.1", url: str = LOGIN):
    for _ in range(5):
        response, logged_in = attempt(username, "wrong", address, url)
        assert response.status_code == 200 and not logged_in


@pytest.fixture
def clock(monkeypatch):
    """clock.advance(seconds): move the throttle's notion of now."""

    class Clock:
        offset = 0.0

        def advance(self, seconds: float):
            self.offset += seconds

    clock = Clock()
    real = login_throttle.now
    monkeypatch.setattr(login_throttle, "now", lambda: real() + clock.offset)
    return clock


def test_it_logs_in_with_the_right_password(owner):
    response, logged_in = attempt("owner", "pw-owner")

    assert response.status_code == 302 and logged_in


def test_it_refuses_the_right_password_after_five_failures(owner):
    fail_five_times("owner")

    response, logged_in = attempt("owner", "pw-owner")

    assert response.status_code == 200 and not logged_in
    assert "Too many failed logins" in response.text
    assert "Try again in 15 minutes" in response.text


def test_it_locks_a_username_at_that_address_only(owner):
    fail_five_times("owner", "10.0.0.1")

    _, there = attempt("owner", "pw-owner", "10.0.0.1")
    response, elsewhere = attempt("owner", "pw-owner", "10.0.0.2")

    assert not there
    assert response.status_code == 302 and elsewhere


def test_one_members_failures_do_not_lock_out_a_colleague_behind_the_same_address(owner, teammate):
    fail_five_times("owner", "10.0.0.1")

    _, owner_logged_in = attempt("owner", "pw-owner", "10.0.0.1")
    response, teammate_logged_in = attempt("teammate", "pw-teammate", "10.0.0.1")

    assert not owner_logged_in
    assert response.status_code == 302 and teammate_logged_in


def test_it_lets_another_user_in_from_another_address(owner, teammate):
    fail_five_times("owner", "10.0.0.1")

    response, logged_in = attempt("teammate", "pw-teammate", "10.0.0.2")

    assert response.status_code == 302 and logged_in


def test_it_refuses_every_user_from_an_address_that_sprays_guesses_over_many_usernames(stranger):
    for i in range(19):  # each username far below its own limit
        attempt(f"member{i % 10}", "wrong", "10.0.0.9")
    assert attempt("stranger", "pw-stranger", "10.0.0.9")[1]

    for i in range(20):
        attempt(f"member{i % 10}", "wrong", "10.0.0.9")

    response, stranger_logged_in = attempt("stranger", "pw-stranger", "10.0.0.9")
    _, elsewhere_logged_in = attempt("stranger", "pw-stranger", "10.0.0.10")

    assert response.status_code == 200 and not stranger_logged_in
    assert "Too many failed logins" in response.text
    assert elsewhere_logged_in


def test_a_success_forgets_its_own_failures_at_that_address(owner):
    for _ in range(4):
        attempt("owner", "wrong", "10.0.0.3")
    assert attempt("owner", "pw-owner", "10.0.0.3")[1]

    for _ in range(4):
        attempt("owner", "wrong", "10.0.0.3")

    assert attempt("owner", "pw-owner", "10.0.0.3")[1]


def test_a_success_does_not_reset_the_address_count_of_other_users(owner, teammate, settings):
    settings.STEERLAB_LOGIN_MAX_ADDRESS_FAILURES = 6
    for _ in range(4):
        attempt("owner", "wrong", "10.0.0.3")
    _, teammate_logged_in = attempt("teammate", "pw-teammate", "10.0.0.3")
    attempt("nobody", "wrong", "10.0.0.3")
    attempt("nobody", "wrong", "10.0.0.3")  # the address's sixth failure

    _, address_logged_in = attempt("teammate", "pw-teammate", "10.0.0.3")
    _, elsewhere_logged_in = attempt("teammate", "pw-teammate", "10.0.0.4")

    assert teammate_logged_in and not address_logged_in and elsewhere_logged_in


def test_it_lets_the_user_in_again_after_the_lockout(owner, clock):
    fail_five_times("owner")
    clock.advance(14 * 60)
    assert not attempt("owner", "pw-owner")[1]

    clock.advance(61)

    response, logged_in = attempt("owner", "pw-owner")
    assert response.status_code == 302 and logged_in


def test_failures_older_than_the_window_do_not_count(owner, clock):
    for _ in range(4):
        attempt("owner", "wrong")
    clock.advance(15 * 60 + 1)
    attempt("owner", "wrong")

    assert attempt("owner", "pw-owner")[1]


def test_the_limits_come_from_settings(owner, teammate, settings):
    settings.STEERLAB_LOGIN_MAX_FAILURES = 2
    settings.STEERLAB_LOGIN_MAX_ADDRESS_FAILURES = 3
    attempt("owner", "wrong")
    attempt("owner", "wrong")

    assert not attempt("owner", "pw-owner")[1]
    assert attempt("teammate", "pw-teammate")[1]

    attempt("nobody", "wrong")

    assert not attempt("teammate", "pw-teammate")[1]


def test_the_admin_login_is_throttled_too(staff):
    fail_five_times("staff", url=ADMIN_LOGIN)

    response, logged_in = attempt("staff", "pw-staff", url=ADMIN_LOGIN)

    assert response.status_code == 200 and not logged_in
    assert "Too many failed logins" in response.text


def test_failures_on_either_login_page_count_together(staff):
    for url in (LOGIN, ADMIN_LOGIN, LOGIN, ADMIN_LOGIN, LOGIN):
        attempt("staff", "wrong", url=url)

    assert not attempt("staff", "pw-staff", url=ADMIN_LOGIN)[1]


def test_a_non_staff_user_on_the_admin_login_is_not_counted_as_a_failure(owner):
    for _ in range(5):
        attempt("owner", "pw-owner", url=ADMIN_LOGIN)

    assert attempt("owner", "pw-owner")[1]


@pytest.mark.parametrize(
    "fields",
    [
        {"username": "own\x00er", "password": "pw-owner"},
        {"username": "99999999999999999999", "password": "x"},
        {"username": "a" * 10_000, "password": "x"},
    ],
)
@pytest.mark.parametrize("url", [LOGIN, ADMIN_LOGIN])
def test_it_answers_odd_input_with_the_form_not_a_500(db, url, fields):
    response = Client().post(url, fields)

    assert response.status_code == 200
