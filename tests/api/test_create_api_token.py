from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from steering_app.models import ApiToken


def create_token(*args) -> str:
    out = StringIO()
    call_command("create_api_token", *args, stdout=out)
    return out.getvalue().strip()


def test_it_prints_a_new_token_and_stores_only_its_hash(owner):
    raw = create_token("owner", "--name", "laptop")

    token = ApiToken.objects.get()
    assert raw.startswith("stl_") and raw not in token.token_hash
    assert token.token_hash == ApiToken.hash(raw)
    assert token.user == owner and token.name == "laptop"


def test_its_token_authenticates_api_requests(client, owner, training):
    raw = create_token("owner")

    assert (
        client.get("/api/trainings/completed", headers={"Authorization": f"Bearer {raw}"}).status_code == 200
    )


def test_it_issues_a_different_token_each_time(owner):
    assert create_token("owner") != create_token("owner")
    assert ApiToken.objects.filter(user=owner).count() == 2


def test_it_refuses_an_unknown_user(db):
    with pytest.raises(CommandError, match="No user named 'ghost'"):
        create_token("ghost")
    assert not ApiToken.objects.exists()


def test_it_refuses_an_inactive_user(owner):
    owner.is_active = False
    owner.save()

    with pytest.raises(CommandError, match="inactive"):
        create_token("owner")
