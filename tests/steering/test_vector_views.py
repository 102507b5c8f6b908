"""The pages of steering vectors: "New steering vector", a vector space with its separation charts, the panel on a
vector space, and the download of any steering as a llama.cpp control vector (panel and run page)."""

import io

import pytest
import torch

from steering_app import vector_jobs, wake
from steering_app.engine.control_vectors import read_file
from steering_app.models import Training, VectorJob
from tests.vector_stand_ins import use_vector_engine

pytestmark = pytest.mark.django_db

NEW = "/steering/vectors/new/"
DOWNLOAD = "/steering/control-vector/"
POSITIVES = "\n".join(f"Planet {i} circles its star." for i in range(6))
NEGATIVES = "\n".join(f"Shop {i} sells bread." for i in range(6))


@pytest.fixture
def stored_only(monkeypatch):
    monkeypatch.setattr(wake, "submit", lambda run_id=None: None)


def form(language_model, **change):
    return {
        "target": f"model-{language_model.pk}",
        "name": "planet",
        "description": "space",
        "method": "diffmean",
        "tokens": "all",
        "positives": POSITIVES,
        "negatives": NEGATIVES,
        "paired": "on",
        **change,
    }


def test_it_asks_anonymous_users_to_log_in(client, vector_space):
    for url in (NEW, f"/steering/vectors/{vector_space.pk}/", DOWNLOAD):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_it_offers_a_new_space_on_each_model_or_a_concept_for_each_space(client, owner, vector_space):
    client.force_login(owner)
    response = client.get(NEW, {"target": f"space-{vector_space.pk}"})
    assert response.status_code == 200
    choices = dict(response.context["form"].fields["target"].choices)
    assert choices["New space on a model"] == [(f"model-{vector_space.model_id}", "tiny-llama")]
    assert choices["Add to a vector space"] == [
        (f"space-{vector_space.pk}", "vectors: planet, cake • tiny-llama")
    ]
    assert response.context["form"]["target"].value() == f"space-{vector_space.pk}"


def test_it_makes_a_job_from_pasted_pairs_and_shows_its_progress(client, owner, language_model, stored_only):
    client.force_login(owner)
    response = client.post(NEW, form(language_model))
    job = VectorJob.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/steering/vectors/{job.training_id}/"
    assert (job.owner, job.paired, job.positives[0], job.negatives[5]) == (
        owner,
        True,
        "Planet 0 circles its star.",
        "Shop 5 sells bread.",
    )
    page = client.get(response["Location"])
    assert page.status_code == 200 and page.context["working"]
    assert 'hx-trigger="every 1s"' in page.text and "Waiting for the worker." in page.text


def test_it_reads_pairs_from_an_uploaded_jsonl_file(client, owner, language_model, stored_only):
    client.force_login(owner)
    lines = "\n".join(f'{{"positive": "Moon {i} rises.", "negative": "Bus {i} leaves."}}' for i in range(5))
    upload = io.BytesIO(lines.encode())
    upload.name = "pairs.jsonl"
    response = client.post(NEW, form(language_model, positives="", negatives="", pairs_file=upload))
    assert response.status_code == 302
    assert VectorJob.objects.get().negatives == [f"Bus {i} leaves." for i in range(5)]


def test_it_refuses_an_upload_past_the_limit_rather_than_reading_part_of_it(
    client, owner, language_model, stored_only, monkeypatch
):
    from steering_app import prompt_sets

    lines = "\n".join(f'{{"positive": "Moon {i} rises.", "negative": "Bus {i} leaves."}}' for i in range(8))
    monkeypatch.setattr(prompt_sets, "MAX_UPLOAD_BYTES", len(lines) - 1)
    upload = io.BytesIO(lines.encode())
    upload.name = "pairs.jsonl"
    client.force_login(owner)
    response = client.post(NEW, form(language_model, positives="", negatives="", pairs_file=upload))
    assert response.status_code == 400
    assert "larger than" in " ".join(response.context["form"].errors["pairs_file"])
    assert not VectorJob.objects.exists()


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"positives": "Planet 1.\nPlanet 2."}, "negatives", "as many negatives as positives"),
        ({"positives": "Planet 1.\nPlanet 2.", "negatives": "Shop 1.\nShop 2."}, "positives", "5"),
        ({"name": ""}, "name", "required"),
        ({"method": "pca", "paired": ""}, "positives", "pca"),
        ({"target": "model-999"}, "target", "not one of the available choices"),
    ],
)
def test_it_shows_a_refused_request_beside_its_field_and_creates_nothing(
    client, owner, language_model, stored_only, change, field, words
):
    client.force_login(owner)
    response = client.post(NEW, form(language_model, **change))
    assert response.status_code == 400
    errors = " ".join(response.context["form"].errors[field])
    assert words in errors
    assert not VectorJob.objects.exists() and not Training.objects.filter(encoder_type="vectors").exists()


def test_it_shows_each_concepts_separation_and_steers_with_it_at_its_best_layer(client, owner, vector_space):
    client.force_login(owner)
    response = client.get(f"/steering/vectors/{vector_space.pk}/")
    assert response.status_code == 200 and not response.context["working"]
    planet, cake = response.context["concepts"]
    assert cake["name"] == "cake"
    assert (planet["name"], planet["accuracy"], len(planet["chart"]["bars"])) == ("planet", 1.0, 4)
    assert [bar["best"] for bar in planet["chart"]["bars"]] == [False, False, True, False]
    assert planet["steer_url"] == f"/steering/?training={vector_space.pk}&feature_id=0&coefficient=1&layers=2"
    assert "every 1s" not in response.text and "Steer with “cake” at L2" in response.text


def test_it_shows_why_a_job_failed(client, owner, language_model, stored_only, monkeypatch):
    client.force_login(owner)
    client.post(NEW, form(language_model))
    job = VectorJob.objects.get()
    vector_jobs.fail(job, "the model ran out of memory")
    page = client.get(f"/steering/vectors/{job.training_id}/")
    assert "Failed: the model ran out of memory. Nothing was added to the space." in page.text


def test_it_makes_the_concept_once_the_worker_has_run(
    client, owner, language_model, stored_only, monkeypatch, engine_data_dir
):
    client.force_login(owner)
    client.post(NEW, form(language_model))
    use_vector_engine(monkeypatch, num_layers=4, hidden=16)
    vector_jobs.process_waiting()
    space = Training.objects.get(encoder_type="vectors")
    page = client.get(f"/steering/vectors/{space.pk}/", headers={"HX-Request": "true"})
    assert page.status_code == 200 and "every 1s" not in page.text  # the polling body stops polling
    assert 'id="concept-0"' in page.text and "Steer with “planet” at L2" in page.text


def test_it_offers_only_additive_steering_on_a_vector_space(client, owner, vector_space):
    client.force_login(owner)
    response = client.get("/steering/", {"training": vector_space.pk})
    assert '<option value="multiplicative" disabled>' in response.text
    assert f'href="/steering/vectors/{vector_space.pk}/"' in response.text
    generate = client.post(
        "/steering/generate/",
        {
            "training": vector_space.pk,
            "prompt": "Hello",
            "method": "multiplicative",
            "layers": [2],
            "feature_id": [0],
            "coefficient": [1.0],
            "temperature": 0.7,
            "max_tokens": 8,
        },
    )
    assert generate.status_code == 422
    assert "only additive steering applies" in generate.text


def download_query(space, **change):
    return {
        "training": space.pk,
        "method": "additive",
        "layers": [1, 3],
        "feature_id": [0],
        "coefficient": [2.0],
        **change,
    }


def test_it_downloads_the_steering_as_a_control_vector(client, owner, vector_space, tmp_path):
    client.force_login(owner)
    response = client.get(DOWNLOAD, download_query(vector_space))
    assert response.status_code == 200
    assert response["Content-Disposition"].startswith("attachment; filename=")
    (tmp_path / "c.gguf").write_bytes(response.content)
    vectors = read_file(tmp_path / "c.gguf", n_embd=16, num_layers=4)
    assert torch.allclose(vectors[3], 2.0 * vector_space.vectors[0][3])


def test_it_asks_with_htmx_first_then_redirects_to_the_file(client, owner, vector_space):
    client.force_login(owner)
    query = {**download_query(vector_space), "prompt": "dropped", "csrfmiddlewaretoken": "x"}
    response = client.get(DOWNLOAD, query, headers={"HX-Request": "true"})
    assert response.status_code == 204
    assert response["HX-Redirect"] == (
        f"{DOWNLOAD}?training={vector_space.pk}&method=additive&layers=1&layers=3&feature_id=0&coefficient=2.0"
    )


def test_it_shows_why_the_steering_cannot_be_exported(client, owner, vector_space):
    client.force_login(owner)
    response = client.get(DOWNLOAD, download_query(vector_space, layers=[0]), headers={"HX-Request": "true"})
    assert response.status_code == 422
    assert "Intervention layers:" in response.text and "block 0" in response.text
    response = client.get(DOWNLOAD, download_query(vector_space, method="multiplicative"))
    assert response.status_code == 400 and "Multiplicative steering cannot be exported" in response.text


def test_it_offers_the_download_on_an_additive_runs_page_only(
    client, owner, vector_space, training, make_run
):
    client.force_login(owner)
    additive = make_run(owner, status="completed", intervention_layers=[2])
    page = client.get(f"/steering/runs/{additive.pk}/")
    assert 'id="download-control-vector"' in page.text
    assert page.context["control_vector_url"] == (
        f"{DOWNLOAD}?training={training.pk}&method=additive&layers=2&feature_id=3&coefficient=2.0"
    )
    multiplicative = make_run(
        owner, status="completed", method="multiplicative", intervention_layers=[training.hook_layer]
    )
    assert 'id="download-control-vector"' not in client.get(f"/steering/runs/{multiplicative.pk}/").text
