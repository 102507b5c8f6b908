"""Admin shows vector jobs read-only, with their progress and report, and links a vector space to its jobs."""

import pytest
from django.urls import reverse

from steering_app.models import Training, VectorJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def space(make_training):
    return make_training(
        encoder_type="vectors", d_sae=1, stats={"concepts": [{"index": 0, "name": "planet"}]}
    )


@pytest.fixture
def running(space):
    return VectorJob.objects.create(
        training=space,
        name="cake",
        positives=["cake"] * 5,
        negatives=["road"] * 5,
        paired=True,
        status="running",
        progress=0.4,
    )


@pytest.fixture
def completed(space):
    return VectorJob.objects.create(
        training=space,
        name="planet",
        positives=["mars"] * 6,
        negatives=["brick"] * 6,
        status="completed",
        progress=1.0,
        report={"separation": [0.5, 1.0], "best_layer": 1, "accuracy": 1.0, "feature_index": 0},
    )


def test_it_lists_vector_jobs_with_their_progress(client, staff, running, completed):
    client.force_login(staff)
    listed = client.get(reverse("admin:steering_app_vectorjob_changelist"))
    assert listed.status_code == 200
    assert b"40%" in listed.content and b"100%" in listed.content


def test_it_shows_a_job_read_only_with_its_examples_and_best_layer(client, staff, running, completed):
    client.force_login(staff)
    shown = client.get(reverse("admin:steering_app_vectorjob_change", args=[completed.pk]))
    assert shown.status_code == 200
    assert b"6 positive, 6 negative examples" in shown.content and b"1 (1.0)" in shown.content
    posted = client.post(reverse("admin:steering_app_vectorjob_change", args=[running.pk]), {"name": "pie"})
    assert posted.status_code == 403
    assert VectorJob.objects.get(pk=running.pk).name == "cake"
    assert client.get(reverse("admin:steering_app_vectorjob_add")).status_code == 403


def test_it_deletes_only_finished_jobs(client, staff, running, completed):
    client.force_login(staff)
    for job in (running, completed):
        client.post(reverse("admin:steering_app_vectorjob_delete", args=[job.pk]), {"post": "yes"})
    assert list(VectorJob.objects.values_list("name", flat=True)) == ["cake"]


def test_a_vector_space_links_to_its_jobs(client, staff, space, running):
    client.force_login(staff)
    shown = client.get(reverse("admin:steering_app_training_change", args=[space.pk]))
    assert shown.status_code == 200
    assert b"1 vector jobs" in shown.content
    assert Training.objects.get(pk=space.pk).label.startswith("vectors: planet • ")
