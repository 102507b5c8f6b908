"""/api/docs: Swagger UI from the project's own static files, nothing from a CDN."""

import re

import pytest
from django.contrib.staticfiles import finders
from django.templatetags.static import static

pytestmark = pytest.mark.django_db

ASSET = re.compile(r"""<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def test_it_loads_swagger_ui_only_from_this_site(client):
    response = client.get("/api/docs")

    assert response.status_code == 200
    assets = ASSET.findall(response.text)
    assert any(url.endswith("swagger-ui-bundle.js") for url in assets), assets
    assert [url for url in assets if re.match(r"(https?:)?//", url)] == []
    assert "cdn.jsdelivr" not in response.text and "unpkg" not in response.text


def test_every_asset_it_references_is_a_static_file_we_ship(client):
    assets = ASSET.findall(client.get("/api/docs").text)
    prefix = static("")

    for url in assets:
        assert url.startswith(prefix), url
        assert finders.find(url.removeprefix(prefix)), url
