"""Malformed request bodies on every JSON endpoint: a 400 in the error shape, and nothing stored."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from presets_app.models import SteeringPreset
from steering_app.json_checks import nesting_depth
from steering_app.models import SteeringRun
from tests.api.support import assert_error

GENERATE = "/api/steering/generate"
PRESETS = "/api/presets/steering"
IMPORT = "/api/presets/steering/import"
DEEP = b"[" * 100_000 + b"]" * 100_000


def preset_body(training, **changes) -> dict:
    body = {
        "training_id": training.pk,
        "name": "calm",
        "features": [{"feature_id": 3, "coefficient": 1.0}],
        "intervention_layers": [2],
    }
    body.update(changes)
    return body


def import_document(training, name="imported") -> dict:
    return {
        "format": "steerlab.presets",
        "version": 1,
        "presets": [
            {
                "name": name,
                "description": "",
                "training": {"id": training.pk, "model_name": "tiny-llama", "hook_layer": 2, "d_sae": 32},
                "features": [{"feature_id": 12, "coefficient": 1.25}],
                "intervention_layers": [0],
                "method": "additive",
                "temperature": 1.0,
                "max_tokens": 20,
                "is_favorite": False,
            }
        ],
    }


def nothing_stored() -> bool:
    return SteeringPreset.objects.count() == 0 and SteeringRun.objects.count() == 0


@pytest.mark.parametrize("url", [GENERATE, PRESETS, IMPORT])
def test_it_refuses_a_body_nested_too_deep(client, owner, bearer, training, url):
    body = assert_error(
        client.post(url, DEEP, content_type="application/json", headers=bearer(owner)),
        400,
        "file" if url == IMPORT else None,
    )

    assert "nested" in body["detail"]
    assert nothing_stored()


def test_it_refuses_a_deep_document_uploaded_as_a_file(client, owner, bearer, training):
    upload = SimpleUploadedFile("deep.json", DEEP, "application/json")

    body = assert_error(client.post(IMPORT, {"file": upload}, headers=bearer(owner)), 400, "file")

    assert "nested" in body["detail"]
    assert nothing_stored()


def test_it_accepts_brackets_inside_strings_however_many(client, owner, bearer, training):
    response = client.post(
        PRESETS,
        json.dumps(preset_body(training, description="[{" * 500)),
        content_type="application/json",
        headers=bearer(owner),
    )

    assert response.status_code == 201, response.content
    assert SteeringPreset.objects.get().description == "[{" * 500


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "\ud800"}, "name"),
        ({"description": "ok \udfff then"}, "description"),
        ({"name": "a\x00b"}, "name"),
        ({"features": [{"feature_id": 3, "coefficient": 1.0, "note\udc00": 1}]}, "features.0"),
    ],
)
def test_it_refuses_surrogates_and_nul_in_any_string_naming_the_field(
    client, owner, bearer, training, changes, field
):
    raw = json.dumps(preset_body(training, **changes))  # ensure_ascii writes "\ud800" escapes

    assert_error(
        client.post(PRESETS, raw, content_type="application/json", headers=bearer(owner)), 400, field
    )
    assert nothing_stored()


def test_it_refuses_a_lone_surrogate_in_a_generate_prompt(client, owner, bearer, training):
    body = {
        "training_id": training.pk,
        "model_id": training.model_id,
        "prompt": "rain \ud83d",
        "features": [{"feature_id": 3, "coefficient": 2.0}],
        "intervention_layers": [2],
    }

    assert_error(
        client.post(GENERATE, json.dumps(body), content_type="application/json", headers=bearer(owner)),
        400,
        "prompt",
    )
    assert nothing_stored()


def test_it_refuses_a_lone_surrogate_in_an_imported_document(client, owner, bearer, training):
    raw = json.dumps(import_document(training, name="bad \ud800"))

    body = assert_error(
        client.post(IMPORT, raw, content_type="application/json", headers=bearer(owner)),
        400,
        "presets[0].name",
    )

    assert "surrogate" in body["detail"]
    assert nothing_stored()


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
@pytest.mark.parametrize("url", [PRESETS, IMPORT])
def test_it_refuses_json_sent_with_another_content_type(client, owner, bearer, training, url, content_type):
    raw = json.dumps(import_document(training) if url == IMPORT else preset_body(training))

    body = assert_error(
        client.post(url, raw, content_type=content_type, headers=bearer(owner)),
        400,
        "file" if url == IMPORT else None,
    )

    assert "application/json" in body["detail"]
    assert nothing_stored()


def test_it_accepts_a_json_content_type_with_a_charset(client, owner, bearer, training):
    response = client.post(
        PRESETS,
        json.dumps(preset_body(training)),
        content_type="application/json; charset=utf-8",
        headers=bearer(owner),
    )

    assert response.status_code == 201, response.content


def test_it_answers_unknown_api_paths_with_a_json_404(client, owner, bearer):
    for path in ("/api/nope", "/api/presets/steering/1/nope", "/api/", "/api/trainings/x/y/z"):
        body = assert_error(client.get(path, headers=bearer(owner)), 404)
        assert path in body["detail"]
    assert_error(client.post("/api/nope", b"{}", content_type="application/json"), 404)


def test_it_measures_nesting_outside_strings_only():
    assert nesting_depth(b'[[{"a": "[[[[\\"[[{{", "b\\\\": [1]}]]') == 4
    assert nesting_depth(b'"just a string"') == 0
    assert nesting_depth(b"[" * 65 + b"]" * 65) == 65
