"""The 403, 404 and 500 pages with DEBUG off: inside the site's layout, with its navigation, and no detail
that would leak (a traceback, the kind of object missing, that a private run exists)."""

import pytest
from django.test import Client, RequestFactory
from django.views import defaults

from steering_app import panel
from steering_app.models import SteeringRun

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def debug_off(settings):
    settings.DEBUG = False


def assert_in_layout(html: str, code: int):
    assert '<link rel="stylesheet" href="/static/css/steerlab.css">' in html
    assert '<header class="topbar">' in html and '<a class="brand" href="/steering/">' in html
    assert f'<p class="error-code mono">{code}</p>' in html
    assert 'href="/steering/runs/"' in html  # the page's own way back
    assert "Traceback" not in html


def test_it_shows_the_404_page_for_another_members_private_run(client, owner, stranger, training):
    run = SteeringRun.objects.create(
        owner=owner,
        training=training,
        prompt="secret",
        seed=1,
        private=True,
        features=[],
        intervention_layers=[2],
    )
    client.force_login(stranger)

    response = client.get(f"/steering/runs/{run.pk}/")

    assert response.status_code == 404
    html = response.text
    assert_in_layout(html, 404)
    assert (
        '<h1 id="error-title">Not found</h1>' in html
        and 'Log out<span class="nav-user"> (stranger)</span>' in html
    )  # the navigation
    assert "secret" not in html and "SteeringRun" not in html


def test_it_shows_the_404_page_for_an_unknown_address_without_a_session(client, db):
    response = client.get("/no/such/page/")

    assert response.status_code == 404
    assert_in_layout(response.text, 404)
    assert "/no/such/page/" in response.text


def test_it_shows_the_403_page_with_the_reason(client, owner, teammate, training):
    run = SteeringRun.objects.create(
        owner=owner, training=training, prompt="shared", seed=1, features=[], intervention_layers=[2]
    )
    client.force_login(teammate)

    response = client.post(f"/steering/runs/{run.pk}/cancel/")

    assert response.status_code == 403
    assert_in_layout(response.text, 403)
    assert "Only the run&#x27;s owner or staff can stop it." in response.text
    assert 'Log out<span class="nav-user"> (teammate)</span>' in response.text


def test_it_shows_the_500_page_when_a_view_fails(owner, training, monkeypatch):
    def broken(state, form=None):
        raise RuntimeError("database password is hunter2")

    monkeypatch.setattr(panel, "panel_context", broken)
    client = Client(raise_request_exception=False)
    client.force_login(owner)

    response = client.get("/steering/")

    assert response.status_code == 500
    assert_in_layout(response.text, 500)
    assert "Something went wrong" in response.text and "hunter2" not in response.text


def test_the_500_page_needs_no_request_context(db):
    request = RequestFactory().get("/steering/")  # no user, no session: what a broken request may lack

    response = defaults.server_error(request)

    assert response.status_code == 500
    html = response.content.decode()
    assert_in_layout(html, 500)
    assert '<a href="/steering/">Steering</a>' in html  # the navigation, without a user to name
