"""The error shape every router of /api/ shares, for failures no single endpoint owns."""

import json

import pytest
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404
from django.http.multipartparser import MultiPartParserError

from steering_app.errors import InvalidInput
from steerproject.api import api
from tests.api.support import assert_error


def test_it_answers_an_unexpected_exception_with_500_and_no_traceback(
    client, owner, bearer, training, monkeypatch
):
    def explode(training_id):
        raise RuntimeError("secret internals")

    monkeypatch.setattr("steering_app.api.get_training", explode)

    body = assert_error(client.get(f"/api/trainings/{training.pk}", headers=bearer(owner)), 500)

    assert body["detail"] == "Internal server error."
    assert "secret" not in body["detail"]


def test_it_serves_the_openapi_schema_and_docs_without_login(client, db):
    schema = client.get("/api/openapi.json").json()

    assert "/api/steering/generate" in schema["paths"]
    assert schema["components"]["schemas"]["Error"]["required"] == ["detail", "field"]
    assert client.get("/api/docs").status_code == 200


def test_it_documents_every_error_status_of_generate(client, db):
    responses = client.get("/api/openapi.json").json()["paths"]["/api/steering/generate"]["post"]["responses"]

    assert set(responses) == {"200", "202", "400", "401", "403", "404", "409", "429", "500", "503", "507"}
    assert responses["507"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


def test_it_documents_bearer_and_session_authentication(client, db):
    schemes = client.get("/api/openapi.json").json()["components"]["securitySchemes"]

    assert {"type": "http", "scheme": "bearer"} in schemes.values()
    assert any(scheme["type"] == "apiKey" and scheme["in"] == "cookie" for scheme in schemes.values())


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (MultiPartParserError("Invalid boundary in multipart: None"), 400),
        (RequestDataTooBig("Request body exceeded settings.DATA_UPLOAD_MAX_MEMORY_SIZE."), 400),
        (PermissionDenied(), 403),
        (Http404(), 404),
        (InvalidInput("name is taken", "name"), 400),
    ],
)
def test_it_maps_django_and_domain_exceptions_to_the_error_shape(rf, exc, status):
    response = api.on_exception(rf.get("/api/anything"), exc)

    body = json.loads(response.content)
    assert response.status_code == status
    assert set(body) == {"detail", "field"} and body["detail"]
