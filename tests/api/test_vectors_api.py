"""POST /api/vectors (a steering vector made from examples, as a job) and a vector space in GET /api/trainings/{id}.

The worker is told but runs nothing unless a test drives it: the vectors' math is tests/engine's, the job's life
tests/steering/test_vector_jobs.py's, the real model's tests/steering/test_vector_steering.py's."""

import pytest

from steering_app import vector_jobs, wake
from steering_app.models import Training, VectorJob
from tests.api.support import assert_error
from tests.vector_stand_ins import use_vector_engine

URL = "/api/vectors"
PAIRS = [[f"Planet {i} circles a star.", f"Shop {i} sells bread."] for i in range(6)]


@pytest.fixture
def stored_only(monkeypatch):
    monkeypatch.setattr(wake, "submit", lambda run_id=None: None)


@pytest.fixture
def post(client, bearer, stored_only):
    def send(user, body):
        return client.post(URL, body, content_type="application/json", headers=bearer(user))

    return send


def test_it_accepts_pairs_and_answers_the_new_space_and_its_job(post, owner, language_model):
    response = post(owner, {"model_id": language_model.pk, "name": "planet", "pairs": PAIRS})
    assert response.status_code == 202, response.content
    body = response.json()
    space = Training.objects.get(pk=body["training_id"])
    job = VectorJob.objects.get(pk=body["job_id"])
    assert space.is_vector_space and space.status == Training.Status.PENDING
    assert (job.training_id, job.owner, job.status, job.name) == (space.pk, owner, "queued", "planet")
    assert job.positives == [pair[0] for pair in PAIRS] and job.paired


def test_it_accepts_positives_and_negatives_for_diffmean(post, owner, language_model):
    positives, negatives = [pair[0] for pair in PAIRS], [pair[1] for pair in PAIRS[:5]]
    body = {"model_id": language_model.pk, "name": "planet", "positives": positives, "negatives": negatives}
    response = post(owner, {**body, "tokens": "last"})
    assert response.status_code == 202, response.content
    job = VectorJob.objects.get()
    assert (job.tokens, job.paired, len(job.negatives)) == ("last", False, 5)


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"method": "svd"}, 400, "method"),
        ({"tokens": "first"}, 400, "tokens"),
        ({"pairs": PAIRS[:3]}, 400, "pairs"),
        ({"pairs": [["only one"]]}, 400, "pairs.0"),
        ({"pairs": None, "positives": ["p"] * 6, "negatives": ["n"] * 6, "method": "pca"}, 400, "pairs"),
        ({"name": " "}, 400, "name"),
        ({"model_id": 999}, 404, "model_id"),
        ({"model_id": None}, 400, "model_id"),
        ({"name": "bad\x00name"}, 400, "name"),
    ],
)
def test_it_refuses_a_bad_request_naming_the_field_and_creates_nothing(
    post, owner, language_model, change, status, field
):
    body = {"model_id": language_model.pk, "name": "planet", "pairs": PAIRS, **change}
    assert_error(post(owner, body), status, field)
    assert not VectorJob.objects.exists() and not Training.objects.filter(encoder_type="vectors").exists()


def test_it_adds_a_concept_to_a_space_and_refuses_a_name_it_has(post, owner, vector_space):
    response = post(owner, {"training_id": vector_space.pk, "name": "sea", "pairs": PAIRS})
    assert response.status_code == 202, response.content
    assert response.json()["training_id"] == vector_space.pk
    assert_error(post(owner, {"training_id": vector_space.pk, "name": "planet", "pairs": PAIRS}), 400, "name")
    assert VectorJob.objects.count() == 1


def test_it_refuses_to_add_a_concept_to_an_sae(post, owner, training):
    assert_error(post(owner, {"training_id": training.pk, "name": "sea", "pairs": PAIRS}), 400, "training_id")


def test_it_answers_401_without_a_token(client, language_model, stored_only):
    response = client.post(
        URL, {"model_id": language_model.pk, "name": "x", "pairs": PAIRS}, content_type="application/json"
    )
    assert response.status_code == 401
    assert not VectorJob.objects.exists()


def test_it_shows_the_job_then_the_space_in_the_training(
    post, client, bearer, owner, language_model, monkeypatch, engine_data_dir
):
    space_id = post(owner, {"model_id": language_model.pk, "name": "planet", "pairs": PAIRS}).json()[
        "training_id"
    ]
    detail = client.get(f"/api/trainings/{space_id}", headers=bearer(owner)).json()
    assert (detail["status"], detail["encoder_type"], detail["vectors"]["concepts"]) == (
        "pending",
        "vectors",
        [],
    )
    assert [(job["name"], job["status"], job["progress"]) for job in detail["vectors"]["jobs"]] == [
        ("planet", "queued", 0.0)
    ]

    use_vector_engine(monkeypatch, num_layers=4, hidden=16)
    assert vector_jobs.process_waiting() == 1
    detail = client.get(f"/api/trainings/{space_id}", headers=bearer(owner)).json()
    assert detail["status"] == "completed" and detail["d_sae"] == 1 and detail["hook_layer"] == 2
    (concept,) = detail["vectors"]["concepts"]
    assert (concept["name"], concept["best_layer"], concept["separation"][2]) == ("planet", 2, 1.0)
    assert detail["vectors"]["jobs"][0]["status"] == "completed"


def test_it_answers_null_vectors_for_an_sae(client, bearer, owner, training):
    assert client.get(f"/api/trainings/{training.pk}", headers=bearer(owner)).json()["vectors"] is None
