"""The Content-Security-Policy header, and pages that need nothing it forbids."""

import re

import pytest

from steerproject.content_security_policy import POLICY

pytestmark = pytest.mark.django_db

INLINE_SCRIPT = re.compile(r"<script\b(?![^>]*\bsrc=)(?![^>]*type=\"application/json\")[^>]*>", re.IGNORECASE)
EVENT_HANDLER = re.compile(r"\s(?:on[a-z]+|hx-on(?::|-)[a-z:-]+)\s*=", re.IGNORECASE)
STYLE_ELEMENT_OR_ATTRIBUTE = re.compile(r"<style\b|\sstyle\s*=", re.IGNORECASE)


def directives() -> dict[str, str]:
    return dict(part.strip().split(" ", 1) for part in POLICY.split(";"))


def test_the_policy_allows_only_this_site_and_nothing_inline():
    policy = directives()

    assert policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert "unsafe-inline" not in POLICY and "unsafe-eval" not in POLICY
    assert policy["object-src"] == "'none'" and policy["frame-ancestors"] == "'none'"


@pytest.mark.parametrize(
    "path", ["/login/", "/api/openapi.json", "/api/nope", "/admin/login/", "/static/js/steering.js"]
)
def test_every_response_carries_the_policy(client, path):
    assert client.get(path)["Content-Security-Policy"] == POLICY


@pytest.mark.parametrize(
    "path", ["/steering/", "/steering/runs/", "/admin/", "/admin/presets_app/steeringpreset/add/"]
)
def test_pages_hold_no_inline_script_handler_or_style(client, staff, training, path):
    client.force_login(staff)

    response = client.get(path)

    assert response.status_code == 200
    assert response["Content-Security-Policy"] == POLICY
    html = response.text
    assert INLINE_SCRIPT.findall(html) == []
    assert EVENT_HANDLER.findall(html) == []
    assert STYLE_ELEMENT_OR_ATTRIBUTE.findall(html) == []
