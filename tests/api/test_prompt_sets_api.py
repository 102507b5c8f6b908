"""/api/prompt-sets: list the sets; create one from a JSON list, pasted text, or an uploaded .txt or .jsonl."""

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from steering_app.models import PromptSet
from tests.api.support import assert_error

URL = "/api/prompt-sets"

pytestmark = pytest.mark.django_db


@pytest.fixture
def post_json(client, bearer, owner):
    """post_json(body) -> the response to the owner's JSON POST."""

    def post(body):
        return client.post(URL, json.dumps(body), content_type="application/json", headers=bearer(owner))

    return post


@pytest.fixture
def upload(client, bearer, owner):
    """upload(filename, content, name=...) -> the response to the owner's multipart POST."""

    def post(filename: str, content: bytes, name: str = "uploaded", **fields):
        form = {"name": name, "file": SimpleUploadedFile(filename, content), **fields}
        return client.post(URL, form, headers=bearer(owner))

    return post


def test_it_lists_every_prompt_set_by_name(client, bearer, owner, teammate):
    PromptSet.objects.create(name="everyday", description="shipped", prompts=["a", "b", "c"])
    PromptSet.objects.create(name="code", prompts=["x"], owner=owner)

    response = client.get(URL, headers=bearer(teammate))

    assert response.status_code == 200
    page = response.json()
    assert page["total"] == 2
    assert [
        (item["name"], item["description"], item["count"], item["owner"]) for item in page["prompt_sets"]
    ] == [("code", "", 1, "owner"), ("everyday", "shipped", 3, None)]


def test_it_creates_a_set_from_a_json_list(post_json, owner):
    response = post_json(
        {"name": " weather ", "description": "rain and sun", "prompts": [" Is it wet? ", "Sunny?"]}
    )

    assert response.status_code == 201, response.content
    stored = PromptSet.objects.get()
    assert response.json()["id"] == stored.pk and response.json()["count"] == 2
    assert (stored.name, stored.description, stored.owner) == ("weather", "rain and sun", owner)
    assert stored.prompts == ["Is it wet?", "Sunny?"]


def test_it_creates_a_set_from_pasted_lines(post_json):
    response = post_json({"name": "pasted", "text": "First prompt\n\n  \nSecond, with a comma\r\nThird\n"})

    assert response.status_code == 201, response.content
    assert PromptSet.objects.get().prompts == ["First prompt", "Second, with a comma", "Third"]


def test_it_creates_a_set_from_an_uploaded_text_file(upload, owner):
    response = upload(
        "prompts.TXT", "\ufeffOne\nTwo \n\nThree\n".encode(), name="from a file", description="d"
    )

    assert response.status_code == 201, response.content
    stored = PromptSet.objects.get()
    assert (stored.name, stored.description, stored.owner) == ("from a file", "d", owner)
    assert stored.prompts == ["One", "Two", "Three"]  # the byte order mark is not part of the first prompt


def test_it_creates_a_set_from_an_uploaded_jsonl_file(upload):
    lines = ['"A plain string"', "", '{"prompt": "From an object", "id": 7}', '"Ünïcode \\u2603"']

    response = upload("prompts.jsonl", "\n".join(lines).encode())

    assert response.status_code == 201, response.content
    assert PromptSet.objects.get().prompts == ["A plain string", "From an object", "Ünïcode ☃"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"name": "s", "prompts": []}, "prompts", "empty"),
        ({"name": "s"}, "prompts", "empty"),
        ({"name": "s", "prompts": ["ok", "  "]}, "prompts", "Prompt 2 is empty"),
        ({"name": "s", "prompts": ["Same", " Same "]}, "prompts", "repeats prompt 1"),
        ({"name": "s", "prompts": [f"prompt {i}" for i in range(1001)]}, "prompts", "at most 1000"),
        ({"name": "s", "prompts": ["x" * 20_001]}, "prompts", "longer than 20000"),
        ({"name": "s", "text": "\n \n"}, "text", "empty"),
        ({"name": "s", "text": "a\na"}, "text", "repeats"),
        ({"name": "s", "prompts": ["a"], "text": "b"}, "prompts", "not both"),
        ({"name": "  ", "prompts": ["a"]}, "name", "name"),
        ({"name": "n" * 201, "prompts": ["a"]}, "name", "200"),
        ({"prompts": ["a"]}, "name", "required"),
        ({"name": "s", "prompts": "a"}, "prompts", "list"),
        ({"name": "s", "prompts": [1]}, "prompts.0", "string"),
    ],
)
def test_it_refuses_a_bad_json_body_naming_the_field(post_json, body, field, words):
    refused = assert_error(post_json(body), 400, field)

    assert words in refused["detail"]
    assert not PromptSet.objects.exists()


def test_it_refuses_a_name_already_taken(post_json):
    PromptSet.objects.create(name="taken", prompts=["a"])

    refused = assert_error(post_json({"name": "taken", "prompts": ["b"]}), 400, "name")

    assert "already exists" in refused["detail"]
    assert PromptSet.objects.get().prompts == ["a"]


@pytest.mark.parametrize(
    ("filename", "content", "words"),
    [
        (
            "p.jsonl",
            b'"fine"\n\n{"prompt": "fine too"}\n{"prompt": "unfinished\n',
            "Line 4 is not valid JSON",
        ),
        (
            "p.jsonl",
            b'"fine"\n{"text": "no prompt key"}\n',
            'Line 2 must be a JSON string or an object with a "prompt"',
        ),
        ("p.jsonl", b'"fine"\n42\n', "Line 2 must be"),
        ("p.jsonl", b'"fine"\n"nul \\u0000 inside"\n', "Line 2"),
        ("p.jsonl", b"[" * 100 + b"]" * 100, "Line 1"),
        ("p.txt", b"one\ntwo\none\n", "Prompt 3 repeats prompt 1"),
        ("p.txt", b"", "empty"),
        ("p.txt", b"nul \x00 inside\n", "Prompt 1"),
        ("p.txt", "caf\u00e9".encode("latin-1"), "not UTF-8"),
        ("p.csv", b"a,b\n", ".txt"),
    ],
)
def test_it_refuses_a_bad_upload_naming_the_file(upload, filename, content, words):
    refused = assert_error(upload(filename, content), 400, "file")

    assert words in refused["detail"]
    assert not PromptSet.objects.exists()


def test_it_refuses_a_multipart_body_without_a_file(client, bearer, owner):
    assert_error(client.post(URL, {"name": "no file"}, headers=bearer(owner)), 400, "file")

    assert not PromptSet.objects.exists()


def test_it_refuses_a_body_that_is_not_json(client, bearer, owner):
    assert_error(client.post(URL, b"{not json", content_type="application/json", headers=bearer(owner)), 400)
    assert_error(client.post(URL, b'{"name": "a"}', content_type="text/plain", headers=bearer(owner)), 400)

    assert not PromptSet.objects.exists()


def test_it_needs_a_login(client):
    assert_error(client.get(URL), 401)
    assert_error(
        client.post(URL, json.dumps({"name": "s", "prompts": ["a"]}), content_type="application/json"), 401
    )

    assert not PromptSet.objects.exists()
