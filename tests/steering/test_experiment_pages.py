"""/steering/experiments/: the list, the new-experiment form, an experiment's page and its actions, the
cells in the run history, and the progress websocket, with a stand-in engine (inline worker)."""

import re
from urllib.parse import parse_qs, urlsplit

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.core.files.uploadedfile import SimpleUploadedFile

from steering_app import consumers, experiments, runs, streaming
from steering_app.models import Experiment, PromptSet, SteeringRun
from tests.fake_engine import sweep_outcome, use_engine
from tests.steering.test_consumers import headers_for
from tests.steering.test_experiments import experiment_request

pytestmark = pytest.mark.django_db

PROMPTS = ["Plan a picnic", "Describe the sea", "Write a haiku"]


def form_data(training, **changes) -> dict:
    """What the new-experiment page posts for features #3 and #7 of `training`."""
    data = {
        "training": training.pk,
        "method": "additive",
        "layers": ["2"],
        "feature_id": ["3", "7"],
        "coefficient": ["2", "1.5"],
        "grouping": "each",
        "prompts": "\n".join(PROMPTS),
        "strengths": "0, 1, 2",
        "seeds": "1",
        "max_tokens": "16",
        "temperature": "0.7",
        "name": "picnic test",
    }
    data.update(changes)
    return data


def completed_experiment(owner, training, **changes) -> Experiment:
    experiment = experiments.create(owner, experiment_request(training, **changes))
    experiment.refresh_from_db()
    assert experiment.status == Experiment.Status.COMPLETED
    return experiment


# --- the list ------------------------------------------------------------------------------------


def test_the_list_requires_login(client):
    response = client.get("/steering/experiments/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_the_list_shows_the_visible_experiments_newest_first(
    client, owner, teammate, stranger, training, engine
):
    mine = completed_experiment(owner, training, name="mine")
    shared = completed_experiment(teammate, training, name="shared")
    secret = completed_experiment(stranger, training, private=True)
    client.force_login(owner)

    response = client.get("/steering/experiments/")

    assert response.status_code == 200
    assert [experiment.pk for experiment in response.context["page"].object_list] == [shared.pk, mine.pk]
    row = response.context["page"].object_list[1]
    assert (row.outputs, row.done_cells, row.total_cells) == (9, 3, 3)
    html = response.content.decode()
    assert f'href="/steering/experiments/{shared.pk}/"' in html and f"/experiments/{secret.pk}/" not in html
    assert client.get(f"/steering/experiments/{secret.pk}/").status_code == 404


# --- the form ------------------------------------------------------------------------------------


def test_the_panel_has_the_evaluate_over_prompts_button(client, owner, training):
    client.force_login(owner)

    html = client.get(f"/steering/?training={training.pk}").content.decode()

    button = re.search(r'<button[^>]*id="evaluate-button"[^>]*>', html, re.DOTALL).group(0)
    assert 'formaction="/steering/experiments/new/"' in button and 'formmethod="get"' in button
    assert 'hx-get="/steering/experiments/new/"' in button and 'hx-include="#steering-form"' in button


def test_the_form_carries_the_panels_features_and_settings(client, owner, training):
    PromptSet.objects.create(name="Everyday instructions", prompts=["Plan a picnic"])
    client.force_login(owner)
    query = (
        f"training={training.pk}&method=additive&layers=2&feature_id=3&coefficient=2"
        "&feature_id=7&coefficient=-1.5&temperature=0.3&chat=1"
    )

    response = client.get(f"/steering/experiments/new/?{query}")

    assert response.status_code == 200
    assert [(f.index, f.coefficient) for f in response.context["features"]] == [(3, 2.0), (7, -1.5)]
    assert response.context["layers"] == [2] and response.context["training"] == training
    form = response.context["form"]
    assert form.initial["temperature"] == 0.3 and form.initial["chat"] is True
    assert form.initial["prompt_set"] == PromptSet.objects.get(name="Everyday instructions").pk
    html = response.content.decode()
    assert '<input type="hidden" name="feature_id" value="7">' in html and "weather and rain" in html
    assert 'value="0, 0.5, 1, 2, 4"' in html and 'name="max_tokens" value="48"' in html


def test_the_panels_own_fields_leave_the_url(client, owner, training):
    client.force_login(owner)
    query = f"training={training.pk}&feature_id=3&coefficient=2&csrfmiddlewaretoken=secret&prompt=Hi&q=rain"

    plain = client.get(f"/steering/experiments/new/?{query}")
    htmx = client.get(f"/steering/experiments/new/?training={training.pk}", headers={"HX-Request": "true"})

    assert plain.status_code == 302
    assert (
        plain["Location"] == f"/steering/experiments/new/?training={training.pk}&feature_id=3&coefficient=2"
    )
    assert (
        htmx.status_code == 204
        and htmx["HX-Redirect"] == f"/steering/experiments/new/?training={training.pk}"
    )


def test_the_form_without_features_points_to_the_panel(client, owner, training):
    client.force_login(owner)

    response = client.get("/steering/experiments/new/")

    assert response.status_code == 200 and 'id="no-features"' in response.content.decode()


def test_the_form_creates_an_experiment_and_goes_to_its_page(client, owner, training, engine):
    client.force_login(owner)

    response = client.post("/steering/experiments/new/", form_data(training))

    experiment = Experiment.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/steering/experiments/{experiment.pk}/"
    assert experiment.owner == owner and experiment.name == "picnic test"
    assert experiment.conditions == [
        {"features": [{"feature_id": 3, "coefficient": 2.0}]},
        {"features": [{"feature_id": 7, "coefficient": 1.5}]},
    ]
    assert experiment.prompts == PROMPTS and experiment.strengths == [0.0, 1.0, 2.0]
    assert (experiment.max_new_tokens, experiment.temperature, experiment.seeds) == (16, 0.7, [0])
    assert experiment.status == Experiment.Status.COMPLETED and experiment.results.count() == 18


def test_all_features_together_are_one_condition_and_a_prompt_set_gives_the_prompts(
    client, owner, training, engine
):
    prompt_set = PromptSet.objects.create(name="two", prompts=["Plan a picnic", "Write a haiku"])
    client.force_login(owner)

    client.post(
        "/steering/experiments/new/",
        form_data(training, grouping="together", prompts="", prompt_set=prompt_set.pk),
    )

    experiment = Experiment.objects.get()
    assert experiment.conditions == [
        {"features": [{"feature_id": 3, "coefficient": 2.0}, {"feature_id": 7, "coefficient": 1.5}]}
    ]
    assert experiment.prompt_set == prompt_set and experiment.prompts == ["Plan a picnic", "Write a haiku"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("prompts.txt", b"Plan a picnic\n\nWrite a haiku\n", ["Plan a picnic", "Write a haiku"]),
        (
            "prompts.jsonl",
            b'"Plan a picnic"\n{"prompt": "Write a haiku", "id": 2}\n',
            ["Plan a picnic", "Write a haiku"],
        ),
    ],
)
def test_an_uploaded_file_gives_the_prompts(client, owner, training, engine, name, content, expected):
    client.force_login(owner)

    client.post(
        "/steering/experiments/new/",
        form_data(training, prompts="", prompts_file=SimpleUploadedFile(name, content)),
    )

    assert Experiment.objects.get().prompts == expected


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"strengths": "0"}, "strengths", "at least one nonzero multiplier"),
        ({"strengths": "0, one"}, "strengths", "numbers separated by commas"),
        ({"prompts": "Same\nSame"}, "prompts", "repeats prompt 1"),
        ({"prompts": ""}, "prompt_set", "Choose a prompt set"),
        ({"seeds": "0"}, "seeds", "seeds must be between 1"),
        ({"layers": ["9"]}, "layers", ""),
        ({"coefficient": ["2", "90"]}, "strengths", "Condition 2"),
        ({"feature_id": ["3", "99"]}, "features", "Condition 2"),
        (
            {"prompts": "", "prompts_file": SimpleUploadedFile("p.jsonl", b"{not json\n")},
            "prompts_file",
            "Line 1 is not valid JSON",
        ),
        (
            {"prompts": "", "prompts_file": SimpleUploadedFile("p.csv", b"Plan a picnic\n")},
            "prompts_file",
            "Upload a .txt file",
        ),
        (
            {"prompts_file": SimpleUploadedFile("p.txt", b"Plan a picnic\n")},
            "prompts_file",
            "not both",
        ),
    ],
)
def test_bad_input_is_the_fields_error_with_status_400_and_creates_nothing(
    client, owner, training, engine, changes, field, message
):
    client.force_login(owner)

    response = client.post("/steering/experiments/new/", form_data(training, **changes))

    assert response.status_code == 400
    errors = response.context["form"].errors
    assert field in errors and message in " ".join(errors[field]), errors
    assert f'id="error-{field}">{errors[field][0][:20]}' in response.content.decode()
    assert not Experiment.objects.exists() and not SteeringRun.objects.exists()


# --- an experiment's page ------------------------------------------------------------------------


def test_the_page_shows_charts_leaderboard_outputs_and_downloads(client, owner, teammate, training, engine):
    experiment = completed_experiment(
        owner,
        training,
        conditions=[
            {"features": [{"feature_id": 3, "coefficient": 2.0}]},
            {"features": [{"feature_id": 7, "coefficient": 1.0}]},
        ],
    )
    client.force_login(teammate)

    response = client.get(f"/steering/experiments/{experiment.pk}/")

    assert response.status_code == 200
    html = response.content.decode()
    for number in (1, 2):
        section = html.split(f'id="condition-{number}"', 1)[1].split("</section>", 1)[0]
        for name in ("concept", "fluency", "relevance", "score"):
            assert len(re.findall(rf'<path class="series series-{name}" d="M [^"]+"', section)) == 1
            assert f'class="band band-{name}"' in section
        assert '<line class="best-marker"' in section and "best ×" in section
        assert section.count("<tr") == 1 + 3 + 1 + 3  # the table's strengths, then the outputs'
    leaderboard = response.context["leaderboard"]
    assert [entry["condition"]["number"] for entry in leaderboard] and len(leaderboard) == 2
    assert 'id="leaderboard"' in html and "weather and rain" in html and "Apply best strength" in html
    examples = [example for condition in response.context["conditions"] for example in condition["examples"]]
    assert len(examples) == 6
    for example in examples:
        for result in (example["best"], example["worst"]):
            assert f'<a href="/steering/runs/{result.run_id}/">run #{result.run_id}</a>' in html
    assert f'href="/api/experiments/{experiment.pk}/results.csv"' in html
    assert f'href="/api/experiments/{experiment.pk}/results.jsonl"' in html
    assert "ws-connect" not in html  # finished: nothing to watch


def test_each_strengths_best_and_worst_output_link_to_their_runs(client, owner, training, engine):
    experiment = completed_experiment(owner, training)
    client.force_login(owner)

    context = client.get(f"/steering/experiments/{experiment.pk}/").context

    (condition,) = context["conditions"]
    assert [example["strength"] for example in condition["examples"]] == [0.0, 1.0, 2.0]
    for example in condition["examples"]:
        results = experiment.results.filter(condition=0, strength=example["strength"])
        assert example["best"].score == max(result.score for result in results)
        assert example["worst"].score == min(result.score for result in results)
        assert example["best"].run.experiment_id == experiment.pk
        assert example["best"].prompt == PROMPTS[example["best"].prompt_index]


def test_apply_best_strength_opens_the_panel_with_the_scaled_coefficients(client, owner, training, engine):
    experiment = completed_experiment(
        owner, training, conditions=[{"features": [{"feature_id": 3, "coefficient": 2.0}]}], temperature=0.4
    )
    client.force_login(owner)
    context = client.get(f"/steering/experiments/{experiment.pk}/").context
    (condition,) = context["conditions"]
    strength = condition["best"]["strength"]

    panel = client.get(condition["apply_url"])

    query = parse_qs(urlsplit(condition["apply_url"]).query)
    assert query["training"] == [str(training.pk)] and query["layers"] == ["2"]
    state = panel.context["state"]
    assert [(f.index, f.coefficient) for f in state.features] == [(3, 2.0 * strength)]
    assert (state.layers, state.method, state.temperature, state.max_tokens) == ([2], "additive", 0.4, 16)


def test_a_running_experiment_has_a_live_progress_bar_and_its_owner_or_staff_a_cancel_button(
    client, owner, teammate, staff, training, queued_only
):
    experiment = experiments.create(owner, experiment_request(training))

    pages = {}
    for user in (owner, teammate, staff):
        client.force_login(user)
        pages[user.username] = client.get(f"/steering/experiments/{experiment.pk}/").content.decode()

    html = pages["owner"]
    assert f'ws-connect="/ws/steering/experiments/{experiment.pk}/"' in html
    assert re.search(r'<progress class="experiment-bar" value="0" max="3"', html)
    assert 'id="cancel-experiment"' in html and 'id="cancel-experiment"' in pages["staff"]
    assert 'id="cancel-experiment"' not in pages["teammate"]
    for page in pages.values():
        assert 'id="resume-experiment"' not in page and 'id="delete-experiment"' not in page


def test_cancel_resume_and_delete_are_for_the_owner_or_staff(
    client, owner, teammate, training, queued_only, monkeypatch
):
    experiment = experiments.create(owner, experiment_request(training))
    url = f"/steering/experiments/{experiment.pk}"
    client.force_login(teammate)
    assert client.post(f"{url}/cancel/").status_code == 403

    client.force_login(owner)
    assert client.post(f"{url}/cancel/")["Location"] == f"{url}/"
    experiment.refresh_from_db()
    assert experiment.status == Experiment.Status.CANCELLED
    html = client.get(f"{url}/").content.decode()
    assert 'id="resume-experiment"' in html and 'id="delete-experiment"' in html
    assert 'id="cancel-experiment"' not in html
    client.force_login(teammate)
    html = client.get(f"{url}/").content.decode()
    assert 'id="resume-experiment"' not in html and 'id="delete-experiment"' not in html
    assert client.post(f"{url}/resume/").status_code == 403
    assert client.post(f"{url}/delete/").status_code == 403

    client.force_login(owner)
    use_engine(monkeypatch, sweep_outcome)
    assert client.post(f"{url}/resume/").status_code == 302
    runs.process_queued()
    html = client.get(f"{url}/").content.decode()
    assert 'id="resume-experiment"' not in html and 'id="delete-experiment"' in html
    response = client.post(f"{url}/delete/", headers={"HX-Request": "true"})
    assert response.status_code == 204 and response["HX-Redirect"] == "/steering/experiments/"
    assert not Experiment.objects.exists()


def test_a_running_experiment_cannot_be_deleted(client, owner, training, queued_only):
    experiment = experiments.create(owner, experiment_request(training))
    client.force_login(owner)

    response = client.post(f"/steering/experiments/{experiment.pk}/delete/")

    assert response.status_code == 409 and "cancel it before deleting it" in response.content.decode()
    assert Experiment.objects.exists()


def test_an_htmx_request_gets_the_body_only(client, owner, training, engine):
    experiment = completed_experiment(owner, training)
    client.force_login(owner)

    html = client.get(
        f"/steering/experiments/{experiment.pk}/", headers={"HX-Request": "true"}
    ).content.decode()

    assert html.lstrip().startswith('<div id="experiment-body"') and "<html" not in html
    assert 'id="leaderboard"' in html


# --- cells in the run history --------------------------------------------------------------------


def test_the_run_history_lists_an_experiments_cells_only_under_it(client, owner, training, make_run, engine):
    experiment = completed_experiment(owner, training)
    comparison = make_run(owner)
    cells = list(SteeringRun.objects.filter(experiment=experiment).order_by("-created_at", "-id"))
    client.force_login(owner)

    history = client.get("/steering/runs/")
    under = client.get(f"/steering/runs/?experiment={experiment.pk}&scope=all")
    cell_page = client.get(f"/steering/runs/{cells[0].pk}/").content.decode()

    assert [run.pk for run in history.context["page"].object_list] == [comparison.pk]
    assert {run.pk for run in under.context["page"].object_list} == {cell.pk for cell in cells}
    assert f'href="/steering/experiments/{experiment.pk}/"' in under.content.decode()
    assert f'<a href="/steering/experiments/{experiment.pk}/">experiment #{experiment.pk}</a>' in cell_page


# --- the progress websocket ----------------------------------------------------------------------


@pytest.fixture
def asgi(settings, monkeypatch):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    monkeypatch.setattr(consumers, "WATCH_SECONDS", 60)  # the events, not the periodic read, move the bar
    from steerproject.asgi import application

    return application


def socket(application, experiment, headers):
    return WebsocketCommunicator(application, f"/ws/steering/experiments/{experiment.pk}/", headers=headers)


async def publish(experiment, **payload):
    await get_channel_layer().group_send(
        streaming.experiment_group(experiment.pk),
        {"type": "experiment.progress", "experiment_id": experiment.pk, **payload},
    )


@pytest.mark.django_db(transaction=True)
def test_the_socket_sends_progress_fragments_then_loads_the_results(
    asgi, owner, teammate, training, queued_only
):
    experiment = experiments.create(owner, experiment_request(training))
    headers = headers_for(teammate)

    async def scenario():
        ws = socket(asgi, experiment, headers)
        connected, _ = await ws.connect()
        first = await ws.receive_from(5)  # the state at connect
        await publish(experiment, status="running", done=2, total=3, tokens_per_second=12.5, eta_seconds=90)
        progress = await ws.receive_from(5)
        await publish(experiment, status="completed", done=3, total=3, tokens_per_second=12.0, eta_seconds=0)
        final = await ws.receive_from(5)
        closed = await ws.receive_output(5)
        await ws.disconnect()
        return connected, first, progress, final, closed

    connected, first, progress, final, closed = async_to_sync(scenario)()

    assert connected and 'data-done="0"' in first
    assert '<div id="experiment-progress"' in progress and 'hx-swap-oob="true"' in progress
    assert 'value="2" max="3"' in progress and "12.5 tokens/s" in progress and "about 2 min left" in progress
    assert '<div id="experiment-body"' in final and 'hx-swap-oob="true"' in final
    assert f'hx-get="/steering/experiments/{experiment.pk}/"' in final and 'hx-trigger="load"' in final
    assert closed["type"] == "websocket.close"


@pytest.mark.django_db(transaction=True)
def test_the_socket_refuses_a_stranger_to_a_private_experiment(asgi, owner, stranger, training, queued_only):
    experiment = experiments.create(owner, experiment_request(training, private=True))
    headers = headers_for(stranger)

    async def scenario():
        ws = socket(asgi, experiment, headers)
        connected, code = await ws.connect()
        return connected, code

    assert async_to_sync(scenario)() == (False, 4404)


@pytest.mark.django_db(transaction=True)
def test_the_socket_of_an_ended_experiment_loads_the_results_at_once(asgi, owner, training, engine):
    experiment = completed_experiment(owner, training)
    headers = headers_for(owner)

    async def scenario():
        ws = socket(asgi, experiment, headers)
        await ws.connect()
        final = await ws.receive_from(5)
        closed = await ws.receive_output(5)
        return final, closed

    final, closed = async_to_sync(scenario)()
    assert 'hx-trigger="load"' in final and closed["type"] == "websocket.close"
