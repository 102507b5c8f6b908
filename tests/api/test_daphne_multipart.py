"""A malformed multipart body reaches Django under daphne (twisted answered it with a bare 400 before)."""

import http.client
import json

import pytest

from tests import processes
from tests.browser.conftest import server_environment

CREATE_TOKEN = """
from django.contrib.auth.models import User
from steering_app.models import ApiToken
print(ApiToken.issue(User.objects.create_user("bob", password="pw-bob-12345"), "test")[1])
"""
COUNT_PRESETS = "from presets_app.models import SteeringPreset; print(SteeringPreset.objects.count())"


@pytest.fixture(scope="module")
def daphne(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("daphne-multipart")
    env = server_environment(workdir)
    env["STEERLAB_DATA_DIR"] = str(workdir)
    processes.manage(env, "migrate", "--noinput")
    token = processes.manage(env, "shell", "-c", CREATE_TOKEN).strip().splitlines()[-1]
    port = processes.free_port()
    process = processes.start_daphne(env, workdir / "daphne.log", port)
    try:
        yield port, token, env
    finally:
        processes.stop(process)


def post(port: int, path: str, body: bytes, headers: dict) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=x"],
)
def test_it_answers_a_broken_multipart_body_in_the_error_shape(daphne, content_type):
    port, token, env = daphne

    status, media_type, raw = post(
        port,
        "/api/presets/steering/import",
        b"--x\r\nnot a part",
        {"Content-Type": content_type, "Authorization": f"Bearer {token}"},
    )

    assert status == 400, raw
    assert media_type.startswith("application/json")
    body = json.loads(raw)
    assert set(body) == {"detail", "field"} and body["detail"]
    assert processes.manage(env, "shell", "-c", COUNT_PRESETS).strip().splitlines()[-1] == "0"


def test_it_still_reads_a_well_formed_multipart_upload(daphne):
    port, token, _ = daphne
    document = {"format": "steerlab.presets", "version": 1, "presets": [{"training": {}}]}
    body = (
        b"--b0undary\r\n"
        b'Content-Disposition: form-data; name="file"; filename="p.json"\r\n'
        b"Content-Type: application/json\r\n\r\n" + json.dumps(document).encode() + b"\r\n--b0undary--\r\n"
    )

    status, _, raw = post(
        port,
        "/api/presets/steering/import",
        body,
        {"Content-Type": "multipart/form-data; boundary=b0undary", "Authorization": f"Bearer {token}"},
    )

    # The document itself was read: its one preset names no training this installation has.
    assert (status, json.loads(raw)["field"]) == (400, "presets[0].training")
