import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import OperationalError

from presets_app import services
from presets_app.models import SteeringPreset
from steering_app.models import Training
from tests.api.support import assert_error
from tests.presets.support import settings_of, snapshot

URL = "/api/presets/steering/import"
EXPORT = "/api/presets/steering/export"


def item(of, **fields):
    values = {
        "name": "imported",
        "description": "from elsewhere",
        "training": {"id": of.pk, "model_name": "tiny-llama", "hook_layer": 2, "d_sae": 32},
        "features": [{"feature_id": 12, "coefficient": 1.25}],
        "intervention_layers": [0, 3],
        "method": "additive",
        "temperature": 1.0,
        "max_tokens": 20,
        "is_favorite": False,
    }
    values.update(fields)
    return values


def document(*items):
    return {"format": "steerlab.presets", "version": 1, "presets": list(items)}


def post_json(client, body):
    return client.post(URL, json.dumps(body), content_type="application/json")


def test_it_imports_a_json_body_as_the_users_presets(login, teammate, training):
    response = post_json(login(teammate), document(item(training), item(training, name="second")))

    assert response.status_code == 201
    body = response.json()
    assert body["created"] == 2
    assert [preset["name"] for preset in body["presets"]] == ["imported", "second"]
    preset = SteeringPreset.objects.get(name="imported")
    assert (preset.owner, preset.training, preset.features) == (
        teammate,
        training,
        [{"feature_id": 12, "coefficient": 1.25}],
    )


def test_it_imports_an_older_export_without_prompt_seed_or_chat(login, owner, training):
    old = item(training)
    assert not {"prompt", "seed", "chat"} & set(old)

    response = post_json(login(owner), document(old))

    assert response.status_code == 201, response.content
    preset = SteeringPreset.objects.get()
    assert (preset.prompt, preset.seed, preset.chat, preset.method) == ("", None, False, "additive")


def test_it_imports_the_prompt_seed_and_chat_of_a_document(login, owner, training):
    response = post_json(login(owner), document(item(training, prompt="Rain?", seed=3, chat=True)))

    assert response.status_code == 201, response.content
    preset = SteeringPreset.objects.get()
    assert (preset.prompt, preset.seed, preset.chat) == ("Rain?", 3, True)


@pytest.mark.parametrize(("field", "value"), [("seed", -3), ("seed", "3"), ("chat", "yes"), ("prompt", 7)])
def test_it_refuses_a_bad_prompt_seed_or_chat_naming_it(login, owner, training, preset, field, value):
    before = snapshot()

    assert_error(
        post_json(login(owner), document(item(training, **{field: value}))), 400, f"presets[0].{field}"
    )

    assert snapshot() == before


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"sweep": [10**400]}, "presets[0].sweep"),
        ({"sweep": [-(10**400)]}, "presets[0].sweep"),
        ({"features": [{"feature_id": 12, "coefficient": 10**400}]}, "presets[0].features"),
        ({"temperature": 10**400}, "presets[0].temperature"),
        ({"max_tokens": 10**400}, "presets[0].max_tokens"),
        ({"seed": 10**400}, "presets[0].seed"),
    ],
)
def test_it_refuses_an_integer_too_large_for_a_float_naming_the_field(
    login, owner, training, preset, fields, field
):
    before = snapshot()

    assert_error(post_json(login(owner), document(item(training, **fields))), 400, field)
    assert snapshot() == before


def test_it_imports_a_multipart_file(login, owner, training):
    upload = SimpleUploadedFile(
        "presets.json", json.dumps(document(item(training))).encode(), "application/json"
    )

    response = login(owner).post(URL, {"file": upload})

    assert response.status_code == 201
    assert response.json()["created"] == 1
    assert SteeringPreset.objects.get().name == "imported"


def test_it_reproduces_exported_presets_exactly(login, owner, teammate, make_preset):
    originals = [
        make_preset(name="a", description="first", is_favorite=True, prompt="Rain?", seed=2**62, chat=True),
        make_preset(
            name="b",
            method="multiplicative",
            intervention_layers=[2],
            temperature=0.0,
            max_tokens=1,
            features=[{"feature_id": 31, "coefficient": -100.0}],
        ),
    ]
    exported = login(owner).get(EXPORT, {"ids": ",".join(str(p.pk) for p in originals)}).content
    SteeringPreset.objects.all().delete()

    response = login(teammate).post(URL, exported, content_type="application/json")

    assert response.status_code == 201
    copies = list(SteeringPreset.objects.order_by("pk"))
    assert [copy.name for copy in copies] == ["a", "b"]
    assert [settings_of(copy) for copy in copies] == [settings_of(original) for original in originals]
    assert {copy.owner for copy in copies} == {teammate}


def test_it_suffixes_names_that_clash(login, owner, make_preset):
    original = make_preset(name="rain")
    exported = login(owner).get(EXPORT, {"ids": str(original.pk)}).content

    login(owner).post(URL, exported, content_type="application/json")
    login(owner).post(URL, exported, content_type="application/json")

    names = list(SteeringPreset.objects.order_by("pk").values_list("name", flat=True))
    assert names == ["rain", "rain (2)", "rain (3)"]
    copy = SteeringPreset.objects.get(name="rain (2)")
    assert settings_of(copy) == settings_of(original)


def test_it_suffixes_clashes_within_the_document(login, owner, training):
    post_json(login(owner), document(item(training, name="same"), item(training, name="same")))

    assert sorted(SteeringPreset.objects.values_list("name", flat=True)) == ["same", "same (2)"]


def test_it_matches_another_installations_training_by_model_layer_and_size(login, owner, training):
    foreign = item(training)
    foreign["training"]["id"] = 4242

    assert post_json(login(owner), document(foreign)).status_code == 201
    assert SteeringPreset.objects.get().training == training


def test_it_prefers_the_same_id_among_trainings_of_the_same_shape(login, owner, training):
    twin = Training.objects.get(pk=training.pk)
    twin.pk = None
    twin.save()

    post_json(login(owner), document(item(training)))

    assert SteeringPreset.objects.get().training_id == training.pk


def test_it_does_not_take_a_different_training_that_has_the_id(login, owner, training):
    foreign = item(training)
    foreign["training"]["d_sae"] = 64

    body = assert_error(post_json(login(owner), document(foreign)), 400, "presets[0].training")
    assert "Preset 1" in body["detail"]
    assert not SteeringPreset.objects.exists()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"this is not json", "file"),
        (b"\xff\xfe\x00", "file"),
        (json.dumps({"format": "something.else", "version": 1, "presets": []}).encode(), "format"),
        (json.dumps(["steerlab.presets"]).encode(), "format"),
        (json.dumps({"format": "steerlab.presets", "version": 2, "presets": []}).encode(), "version"),
        (json.dumps({"format": "steerlab.presets", "version": 1, "presets": []}).encode(), "presets"),
    ],
    ids=["not-json", "not-utf8", "wrong-format", "not-an-object", "wrong-version", "no-presets"],
)
def test_it_refuses_a_malformed_document_and_changes_nothing(login, owner, preset, raw, field):
    before = snapshot()

    assert_error(login(owner).post(URL, raw, content_type="application/json"), 400, field)
    assert snapshot() == before


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"features": [{"feature_id": 99, "coefficient": 1.0}]}, "presets[1].features"),
        ({"features": [{"feature_id": 2**80, "coefficient": 1.0}]}, "presets[1].features"),
        ({"features": [{"feature_id": 3, "coefficient": "lots"}]}, "presets[1].features"),
        ({"intervention_layers": [4]}, "presets[1].intervention_layers"),
        ({"intervention_layers": "2"}, "presets[1].intervention_layers"),
        ({"temperature": 3}, "presets[1].temperature"),
        ({"max_tokens": 0}, "presets[1].max_tokens"),
        ({"method": "multiplicative"}, "presets[1].intervention_layers"),
        ({"name": 5}, "presets[1].name"),
        ({"name": "x" * 201}, "presets[1].name"),
        ({"description": "nul\x00"}, "presets[1].description"),
        ({"is_favorite": "yes"}, "presets[1].is_favorite"),
        ({"temperature": True}, "presets[1].temperature"),
        ({"max_tokens": True}, "presets[1].max_tokens"),
        ({"features": [{"feature_id": True, "coefficient": 1.0}]}, "presets[1].features"),
        ({"intervention_layers": [False]}, "presets[1].intervention_layers"),
        ({"training": {"id": 1}}, "presets[1].training"),
        ({"training": {"model_name": "gpt-9", "hook_layer": 2, "d_sae": 32}}, "presets[1].training"),
    ],
)
def test_it_imports_nothing_when_one_preset_is_invalid_and_names_it(
    login, owner, training, preset, fields, field
):
    before = snapshot()

    response = post_json(login(owner), document(item(training), item(training, **fields)))

    body = assert_error(response, 400, field)
    assert body["detail"].startswith("Preset 2 (presets[1]")
    assert snapshot() == before


def test_it_refuses_a_preset_that_is_not_an_object(login, owner, training):
    assert_error(post_json(login(owner), document(item(training), "rain")), 400, "presets[1]")
    assert not SteeringPreset.objects.exists()


def test_it_refuses_a_body_over_one_megabyte(login, owner, training, preset):
    before = snapshot()
    padded = document(item(training, description="x" * 100))
    padded["padding"] = "x" * services.MAX_IMPORT_BYTES

    response = post_json(login(owner), padded)

    assert_error(response, 400, "file")
    assert snapshot() == before


def test_it_refuses_a_file_over_one_megabyte(login, owner, training, preset):
    before = snapshot()
    padded = document(item(training))
    padded["padding"] = "x" * (services.MAX_IMPORT_BYTES - len(json.dumps(padded)) + 10)
    raw = json.dumps(padded).encode()
    assert services.MAX_IMPORT_BYTES < len(raw) < services.MAX_IMPORT_BYTES + 100

    response = login(owner).post(URL, {"file": SimpleUploadedFile("big.json", raw, "application/json")})

    assert_error(response, 400, "file")
    assert snapshot() == before


def test_it_refuses_a_body_far_over_the_limit_before_reading_it(login, owner, training):
    huge = b" " * (3 * services.MAX_IMPORT_BYTES) + json.dumps(document(item(training))).encode()

    assert_error(login(owner).post(URL, huge, content_type="application/json"), 400, "file")
    assert not SteeringPreset.objects.exists()


def test_it_wants_the_multipart_field_named_file(login, owner, training):
    upload = SimpleUploadedFile("p.json", json.dumps(document(item(training))).encode(), "application/json")

    assert_error(login(owner).post(URL, {"document": upload}), 400, "file")


def test_it_refuses_anonymous_users(client, training):
    assert_error(post_json(client, document(item(training))), 401)
    assert not SteeringPreset.objects.exists()


def test_it_writes_a_large_import_in_batches_with_few_queries(
    login, owner, training, monkeypatch, django_assert_max_num_queries
):
    monkeypatch.setattr(services, "IMPORT_BATCH_SIZE", 50)
    items = [
        item(training, name=f"p{n}", features=[{"feature_id": n % 32, "coefficient": 1.0}])
        for n in range(520)
    ]
    client = login(owner)

    # Validation reads each training's features once, not once per preset; 11 batches of at most 50 rows.
    with django_assert_max_num_queries(60):
        response = post_json(client, document(*items))

    assert response.status_code == 201
    assert response.json()["created"] == 520
    stored = list(SteeringPreset.objects.order_by("pk").values_list("name", "owner", "training"))
    assert stored == [(f"p{n}", owner.pk, training.pk) for n in range(520)]


def test_it_deletes_the_written_batches_when_a_later_batch_fails(
    login, owner, training, make_preset, monkeypatch
):
    make_preset(name="taken")
    before = snapshot()
    monkeypatch.setattr(services, "IMPORT_BATCH_SIZE", 3)
    # As if another member saved "taken" after the import had checked its names.
    monkeypatch.setattr(services, "taken_names", lambda training: set())
    items = [item(training, name=f"p{n}") for n in range(7)] + [item(training, name="taken")]

    response = post_json(login(owner), document(*items))

    body = assert_error(response, 400, "presets")
    assert "nothing was imported" in body["detail"]
    assert snapshot() == before


def test_it_deletes_the_written_batches_when_the_database_fails(owner, training, monkeypatch):
    monkeypatch.setattr(services, "IMPORT_BATCH_SIZE", 2)
    bulk_create = SteeringPreset.objects.bulk_create
    calls = iter(range(100))

    def failing_third_batch(presets):
        if next(calls) == 2:
            raise OperationalError("database is locked")
        return bulk_create(presets)

    monkeypatch.setattr(SteeringPreset.objects, "bulk_create", failing_third_batch)

    with pytest.raises(OperationalError):
        services.import_document(owner, document(*[item(training, name=f"p{n}") for n in range(6)]))

    assert not SteeringPreset.objects.exists()
