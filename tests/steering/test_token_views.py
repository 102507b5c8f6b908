"""/steering/tokens/: a user's API tokens, made, listed and revoked in the app."""

from datetime import UTC, datetime

import pytest
from django.utils import timezone

from steering_app.models import ApiToken

pytestmark = pytest.mark.django_db


def test_it_requires_login(client):
    assert client.get("/steering/tokens/").status_code == 302
    assert client.post("/steering/tokens/", {"name": "x"}).status_code == 302
    assert not ApiToken.objects.exists()


def test_it_issues_a_token_shown_once_that_authenticates(client, owner):
    client.force_login(owner)
    response = client.post("/steering/tokens/", {"name": "laptop"})
    assert response.status_code == 200
    raw = response.context["raw_token"]
    assert raw.startswith(ApiToken.PREFIX) and raw in response.content.decode()
    token = ApiToken.objects.get(user=owner)
    assert token.name == "laptop" and token.token_hash == ApiToken.hash(raw)
    listing = client.get("/steering/tokens/").content.decode()
    assert "laptop" in listing and raw not in listing
    assert ApiToken.user_for(raw) == owner


def test_it_lists_only_the_users_live_tokens_with_their_last_use(client, owner, teammate):
    used, _ = ApiToken.issue(owner, "notebook")
    used.last_used_at = datetime(2026, 3, 4, 5, 6, tzinfo=UTC)
    used.save()
    ApiToken.objects.filter(pk=ApiToken.issue(owner, "old")[0].pk).update(revoked_at=timezone.now())
    ApiToken.issue(teammate, "theirs")
    client.force_login(owner)
    response = client.get("/steering/tokens/")
    assert [token.name for token in response.context["tokens"]] == ["notebook"]
    assert "2026-03-04 05:06" in response.content.decode()


def test_it_refuses_a_name_too_long(client, owner):
    client.force_login(owner)
    response = client.post("/steering/tokens/", {"name": "x" * 101})
    assert response.status_code == 400
    assert not ApiToken.objects.exists()


def test_the_owner_revokes_a_token(client, owner):
    token, raw = ApiToken.issue(owner, "ci")
    client.force_login(owner)
    response = client.post(f"/steering/tokens/{token.pk}/revoke/")
    assert response.status_code == 302 and response["Location"] == "/steering/tokens/"
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert ApiToken.user_for(raw) is None


def test_another_user_cannot_revoke_a_token(client, owner, teammate, staff):
    token, raw = ApiToken.issue(owner, "ci")
    for other in (teammate, staff):
        client.force_login(other)
        assert client.post(f"/steering/tokens/{token.pk}/revoke/").status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None and ApiToken.user_for(raw) == owner


def test_revoking_needs_a_post_with_csrf(owner):
    from django.test import Client

    token, _ = ApiToken.issue(owner, "ci")
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    assert client.get(f"/steering/tokens/{token.pk}/revoke/").status_code == 405
    assert client.post(f"/steering/tokens/{token.pk}/revoke/").status_code == 403
    token.refresh_from_db()
    assert token.revoked_at is None


def test_every_page_links_the_api_docs_and_tokens(client, owner):
    client.force_login(owner)
    html = client.get("/steering/runs/").content.decode()
    assert 'href="/api/docs"' in html and 'href="/steering/tokens/"' in html
