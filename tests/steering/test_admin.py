import pytest
from django.urls import reverse

from steering_app.models import ApiToken, Dataset, LanguageModel, SteeringRun

pytestmark = pytest.mark.django_db

CHANGELISTS = ["languagemodel", "dataset", "training", "feature", "steeringrun", "apitoken"]


@pytest.fixture
def populated(training, owner):
    SteeringRun.objects.create(
        owner=owner,
        training=training,
        prompt="Hi",
        seed=1,
        features=[{"feature_id": 3, "coefficient": 2.0}],
        intervention_layers=[2],
    )
    ApiToken.issue(owner, "script")
    return training


@pytest.mark.parametrize("model_name", CHANGELISTS)
def test_it_shows_each_changelist_to_staff(client, staff, populated, model_name):
    client.force_login(staff)
    response = client.get(reverse(f"admin:steering_app_{model_name}_changelist"))
    assert response.status_code == 200


@pytest.mark.parametrize("model_name", CHANGELISTS)
def test_it_redirects_anonymous_users_to_the_admin_login(client, populated, model_name):
    url = reverse(f"admin:steering_app_{model_name}_changelist")
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))


def test_it_keeps_members_who_are_not_staff_out(client, owner, populated):
    client.force_login(owner)
    response = client.get(reverse("admin:steering_app_training_changelist"))
    assert response.status_code == 302


def test_it_shows_a_trainings_feature_count_and_links_to_its_features(client, staff, training):
    client.force_login(staff)
    changelist = client.get(reverse("admin:steering_app_training_changelist")).content.decode()
    assert '<td class="field-feature_count">32</td>' in changelist
    change = client.get(reverse("admin:steering_app_training_change", args=[training.pk])).content.decode()
    assert f"?training__id__exact={training.pk}" in change and "32 features" in change


@pytest.mark.parametrize(
    ("query", "expected"), [("weather", ["weather and rain"]), ("12", ["cooking recipes"])]
)
def test_it_searches_features_by_label_description_and_index(client, staff, training, query, expected):
    client.force_login(staff)
    response = client.get(reverse("admin:steering_app_feature_changelist"), {"q": query})
    assert [feature.label for feature in response.context["cl"].result_list] == expected


def test_it_revokes_api_tokens_from_the_admin_action(client, staff, owner):
    token, raw = ApiToken.issue(owner)
    client.force_login(staff)
    client.post(
        reverse("admin:steering_app_apitoken_changelist"),
        {"action": "revoke", "_selected_action": [token.pk]},
    )
    token.refresh_from_db()
    assert token.revoked_at is not None and ApiToken.user_for(raw) is None


def add_dataset(client, source):
    return client.post(
        reverse("admin:steering_app_dataset_add"),
        {"name": "lab-corpus", "source": source, "description": "", "num_tokens": 0},
    )


@pytest.mark.parametrize("file", ["secret_key", "steerlab.sqlite3"])
def test_it_refuses_a_dataset_source_outside_the_dataset_roots(client, staff, data_dir, dataset_dir, file):
    client.force_login(staff)

    response = add_dataset(client, str(data_dir / file))

    assert response.status_code == 200
    (error,) = response.context["adminform"].form.errors["source"]
    assert str(data_dir / file) in error and "not under a dataset root" in error
    assert str(data_dir / "datasets") in error and str(dataset_dir) in error
    assert not Dataset.objects.exists()


def test_it_registers_a_corpus_under_a_dataset_root(client, staff, data_dir):
    (data_dir / "datasets" / "corpus.txt").write_text("A document.")
    client.force_login(staff)

    response = add_dataset(client, str(data_dir / "datasets" / "corpus.txt"))

    assert response.status_code == 302
    assert Dataset.objects.get().source == str(data_dir / "datasets" / "corpus.txt")


def test_it_records_a_hub_dataset_name_which_no_job_reads(client, staff, data_dir):
    client.force_login(staff)

    response = add_dataset(client, "monology/pile-uncopyrighted")

    assert response.status_code == 302 and Dataset.objects.get().source == "monology/pile-uncopyrighted"


def admin_form_data(client, url: str) -> dict:
    """The change form's fields as the page fills them: what a staff member's Save posts unchanged."""
    form = client.get(url).context["adminform"].form
    data = {name: form[name].value() for name in form.fields}
    return {name: "" if value is None else value for name, value in data.items()} | {"_save": "Save"}


def test_a_completed_trainings_model_layer_and_hook_cannot_be_changed(
    client, staff, training, language_model
):
    other_model = LanguageModel.objects.create(
        name="other",
        source="/nonexistent/other",
        architecture="LlamaForCausalLM",
        num_layers=30,
        hidden_size=16,
    )
    client.force_login(staff)
    url = reverse("admin:steering_app_training_change", args=[training.pk])
    data = admin_form_data(client, url)
    assert "hook_layer" not in data and "model" not in data and "hook_name" not in data

    response = client.post(
        url, {**data, "hook_layer": "12", "model": other_model.pk, "hook_name": "blocks.12"}
    )

    assert response.status_code == 302
    training.refresh_from_db()
    assert (training.hook_layer, training.model_id, training.hook_name) == (
        2,
        language_model.pk,
        "blocks.2.hook_resid_post",
    )


def test_a_pending_trainings_layer_can_still_be_set(client, staff, make_training):
    pending = make_training(status="pending", hook_layer=1)
    client.force_login(staff)
    url = reverse("admin:steering_app_training_change", args=[pending.pk])

    response = client.post(url, {**admin_form_data(client, url), "hook_layer": "3"})

    assert response.status_code == 302
    pending.refresh_from_db()
    assert pending.hook_layer == 3
