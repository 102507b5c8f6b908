"""A 1 MB preset import through a real daphne server while two other members read and write.

The server runs as deployed by default: SQLite in a file under a temporary STEERLAB_DATA_DIR, no
DATABASE_URL, no REDIS_URL, the embedded worker. Every loop is bounded in rounds and in time.
"""

import http.client
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import processes

ROOT = Path(__file__).resolve().parents[2]
SETUP_SECONDS = 120
REQUEST_SECONDS = 60
LOAD_SECONDS = 180
MAX_ROUNDS = 400
MAX_IMPORT_BYTES = 1024 * 1024
MEMBERS = ("bob", "carol")

SEED = """
import json
from django.contrib.auth import get_user_model
from django.utils import timezone
from steering_app.models import ApiToken, Feature, LanguageModel, Training

model = LanguageModel.objects.create(
    name="tiny-llama", source="/nonexistent/tiny", architecture="LlamaForCausalLM", num_layers=4, hidden_size=16
)
training = Training.objects.create(
    model=model, encoder_type="topk", hook_layer=2, hook_name="blocks.2.hook_resid_post", d_in=16, d_sae=64,
    checkpoint_path="/nonexistent/sae", status="completed", completed_at=timezone.now(),
)
Feature.objects.bulk_create(
    Feature(training=training, index=i, label=f"feature #{i}", max_activation=1.0, activation_frequency=0.01)
    for i in range(64)
)
tokens = {}
for username in ("alice", "bob", "carol"):
    user = get_user_model().objects.create_user(username, password="pw-" + username)
    tokens[username] = ApiToken.issue(user, "load test")[1]
print(json.dumps({"training": training.pk, "tokens": tokens}))
"""


@dataclass
class Server:
    port: int
    database: Path
    training: int
    tokens: dict
    log: Path


@pytest.fixture
def server(tmp_path):
    data_dir = tmp_path / "data"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "REDIS_URL", "STEERLAB_WORKER_MODE", "DJANGO_SETTINGS_MODULE")
    }
    env.update(
        STEERLAB_DATA_DIR=str(data_dir),
        SECRET_KEY="load-test-secret-key",
        DEBUG="0",
        ALLOWED_HOSTS="127.0.0.1",
        PYTHONUNBUFFERED="1",
    )
    processes.manage(env, "migrate", "--noinput")
    seed = json.loads(processes.manage(env, "shell", "--no-imports", "-c", SEED).strip().splitlines()[-1])
    log = tmp_path / "daphne.log"
    port = processes.free_port()
    server = processes.start_daphne(env, log, port)
    try:
        yield Server(port, data_dir / "steerlab.sqlite3", seed["training"], seed["tokens"], log)
    finally:
        processes.stop(server)


@dataclass
class Call:
    who: str
    method: str
    path: str
    status: int
    started: float
    ended: float
    writes: bool = False

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Client:
    server: Server
    who: str
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self):
        self.connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=REQUEST_SECONDS)

    def send(self, method: str, path: str, body=None, writes: bool = False) -> tuple[int, object]:
        headers = {"Authorization": f"Bearer {self.server.tokens[self.who]}"}
        raw = None
        if body is not None:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        started = time.monotonic()
        self.connection.request(method, path, body=raw, headers=headers)
        response = self.connection.getresponse()
        content = response.read()
        self.calls.append(Call(self.who, method, path, response.status, started, time.monotonic(), writes))
        try:
            return response.status, json.loads(content)
        except ValueError:
            return response.status, content.decode(errors="replace")

    def one_round(self, number: int) -> None:
        """A member's everyday traffic: two reads, then create, edit and star a preset of their own."""
        presets = "/api/presets/steering"
        self.send("GET", f"{presets}?training_id={self.server.training}&limit=20")
        self.send("GET", "/api/trainings/completed")
        status, created = self.send(
            "POST",
            presets,
            {
                "training_id": self.server.training,
                "name": f"{self.who} {number}",
                "features": [{"feature_id": number % 64, "coefficient": 2.0}],
                "intervention_layers": [2],
            },
            writes=True,
        )
        if status == 201:
            self.send("PATCH", f"{presets}/{created['id']}", {"description": "edited"}, writes=True)
            self.send("POST", f"{presets}/{created['id']}/favorite", writes=True)


def import_document(server: Server) -> tuple[bytes, int]:
    """Compact presets up to just under 1 MB, the import limit: about 6,000."""

    def item(number):
        return {
            "name": f"p{number}",
            "training": {"id": server.training, "model_name": "tiny-llama", "hook_layer": 2, "d_sae": 64},
            "features": [{"feature_id": number % 64, "coefficient": 1.5}],
            "intervention_layers": [1, 2],
        }

    size = len(json.dumps(item(99999), separators=(",", ":"))) + 1
    items = [item(number) for number in range((MAX_IMPORT_BYTES - 100) // size)]
    document = {"format": "steerlab.presets", "version": 1, "presets": items}
    raw = json.dumps(document, separators=(",", ":")).encode()
    while len(raw) > MAX_IMPORT_BYTES:
        items.pop()
        raw = json.dumps(document, separators=(",", ":")).encode()
    return raw, len(items)


def test_it_serves_other_members_while_a_large_import_runs(server):
    raw, count = import_document(server)
    members = [Client(server, who) for who in MEMBERS]
    importer = Client(server, "alice")
    import_done = threading.Event()
    deadline = time.monotonic() + LOAD_SECONDS
    errors = []

    def keep_busy(client):
        try:
            for number in range(MAX_ROUNDS):
                if import_done.is_set() or time.monotonic() > deadline:
                    return
                client.one_round(number)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(f"{client.who}: {error!r}")

    for member in members:
        member.one_round(MAX_ROUNDS)  # a first round each, so that the load starts warm
    threads = [threading.Thread(target=keep_busy, args=(member,)) for member in members]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        status, body = importer.send("POST", "/api/presets/steering/import", raw, writes=True)
    finally:
        import_done.set()
        for thread in threads:
            thread.join(timeout=REQUEST_SECONDS * 2)

    imported = importer.calls[-1]
    others = [call for member in members for call in member.calls]
    during = [call for call in others if call.started < imported.ended and call.ended > imported.started]
    statuses = sorted({call.status for call in others})
    print(
        f"\nimport: {count} presets, {len(raw)} bytes, status {status}, {imported.seconds:.2f} s wall;"
        f" other members: {len(others)} requests ({len(during)} during the import),"
        f" max latency {max(call.seconds for call in others):.3f} s"
        f" (during the import {max((call.seconds for call in during), default=0):.3f} s),"
        f" statuses {statuses}"
    )

    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    assert status == 201, (body, server.log.read_text()[-4000:])
    assert body["created"] == count
    assert {member.who for member in members} == {call.who for call in during}
    assert [call for call in others if call.status >= 500] == []
    assert [call for call in others if call.writes and call.status not in (200, 201)] == []
    assert [call for call in others if not call.writes and call.status != 200] == []

    connection = sqlite3.connect(server.database)
    try:
        stored = dict(
            connection.execute(
                "SELECT u.username, COUNT(*) FROM presets_app_steeringpreset p"
                " JOIN auth_user u ON u.id = p.owner_id GROUP BY u.username"
            ).fetchall()
        )
        edited = dict(
            connection.execute(
                "SELECT u.username, COUNT(*) FROM presets_app_steeringpreset p JOIN auth_user u"
                " ON u.id = p.owner_id WHERE p.is_favorite AND p.description = 'edited' GROUP BY u.username"
            ).fetchall()
        )
    finally:
        connection.close()
    created_by = {
        member.who: sum(
            call.method == "POST" and call.path == "/api/presets/steering" for call in member.calls
        )
        for member in members
    }
    assert stored == {"alice": count, **created_by}
    assert edited == created_by
