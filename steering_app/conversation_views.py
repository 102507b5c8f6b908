"""Server-rendered conversation pages (chat mode): the list, a conversation with its turns, and the panel's
Start chat. A conversation's life is conversations.py's; a turn streams over its run's websocket, as the run page
does. These functions read the request, call those, and render."""

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from steering_app import conversations, presenters
from steering_app.errors import Conflict, Forbidden, SteeringError
from steering_app.forms import ChatForm, MessageForm
from steering_app.models import Conversation, Feature
from steering_app.views import delete_then_go, go_to, refused, visible_or_404

CONVERSATIONS_PER_PAGE = 20
DETAIL_TEMPLATE = "steering/conversations/detail.html"


@login_required
@require_GET
def conversation_list(request):
    """The member's own conversations and the lab's shared ones (staff: all), latest activity first."""
    visible = (
        Conversation.objects.visible_to(request.user)
        .select_related("owner", "training__model")
        .annotate(turn_count=Count("runs__turn", distinct=True))
        .order_by("-updated_at", "-id")  # Django leaves Meta.ordering out of an aggregate query
    )
    page = Paginator(visible, CONVERSATIONS_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "steering/conversations/list.html", {"page": page})


@login_required
@require_POST
def new_conversation(request):
    """The panel's Start chat: a conversation with the panel's steering, then its page."""
    form = ChatForm(request.POST)
    if not form.is_valid():
        return refused(request, form, status=422)
    try:
        conversation = conversations.create(request.user, form.conversation_request())
    except SteeringError as error:
        form.add_steering_error(error)
        return refused(request, form, status=422)
    return go_to(request, reverse("steering-conversation", args=[conversation.pk]))


@login_required
@require_GET
def conversation_detail(request, pk):
    return _render(request, _visible(request, pk))


@login_required
@require_POST
def send_message(request, pk):
    conversation = _visible(request, pk)
    if not conversation.can_change(request.user):
        raise PermissionDenied("Only the conversation's owner or staff can send a message.")
    form = MessageForm(request.POST)
    if form.is_valid():
        try:
            data = form.cleaned_data
            conversations.send(conversation, request.user, data["content"], data["seed"], form.changes())
        except SteeringError as error:  # WorkerUnavailable included: the turn failed, the form says why
            form.add_steering_error(error)
    if form.errors:
        conversation.refresh_from_db()
        return _render(request, conversation, form=form, status=422)
    return redirect("steering-conversation", pk=conversation.pk)


@login_required
@require_POST
def regenerate(request, pk):
    """Regenerate: the last turn again with another seed."""
    return _change(request, pk, lambda conversation: conversations.regenerate(conversation, request.user))


@login_required
@require_POST
def visibility(request, pk):
    """The owner's Private / Share switch (private=1 or 0): the conversation and every turn."""
    return _change(
        request,
        pk,
        lambda conversation: conversation.set_private(request.user, request.POST.get("private") == "1"),
    )


@login_required
@require_POST
def delete_conversation(request, pk):
    return delete_then_go(request, _visible(request, pk), _render, reverse("steering-conversations"))


@login_required
@require_POST
def continue_from(request, pk):
    """Continue from here: the turns up to this one copied into a conversation of the reader's own."""
    conversation = _visible(request, pk)
    try:
        copy = conversations.continue_from(conversation, request.user, _turn(request.POST.get("turn")))
    except SteeringError as error:
        return _render(request, conversation, notice=error.message, status=400)
    return redirect("steering-conversation", pk=copy.pk)


def _turn(raw: str | None) -> int | None:
    return int(raw) if raw and raw.isdecimal() and len(raw) < 10 else None


def _visible(request, pk) -> Conversation:
    return visible_or_404(request, Conversation, pk, "owner", "training__model", "training__dataset")


def _change(request, pk, action):
    conversation = _visible(request, pk)
    try:
        action(conversation)
    except Forbidden as error:
        raise PermissionDenied(error.message) from error
    except SteeringError as error:
        return _render(
            request, conversation, notice=error.message, status=409 if isinstance(error, Conflict) else 400
        )
    return redirect("steering-conversation", pk=conversation.pk)


def _render(
    request, conversation: Conversation, notice: str = "", status: int = 200, form: MessageForm | None = None
):
    """The page; delete_then_go's refusal passes (notice, status) in that order."""
    turns = conversation.turns()
    indices = [item["feature_id"] for item in conversation.features]
    labels = dict(
        Feature.objects.filter(training=conversation.training, index__in=indices).values_list(
            "index", "label"
        )
    )
    rows = []
    previous = None
    for run in turns:
        row = {"run": run, "changes": steering_changes(previous, run), "metrics": compact_metrics(run)}
        if not run.is_finished:
            row.update(presenters.result_context(run))
        rows.append(row)
        previous = run
    can_change = conversation.can_change(request.user)
    if form is None and can_change:
        form = MessageForm(initial=message_initial(conversation))
    context = {
        "conversation": conversation,
        "turns": rows,
        "can_change": can_change,
        "in_progress": any(not row["run"].is_finished for row in rows),
        "form": form,
        "features": [{**item, "label": labels.get(item["feature_id"], "")} for item in conversation.features],
        "notice": notice,
    }
    return render(request, DETAIL_TEMPLATE, context, status=status)


def message_initial(conversation: Conversation) -> dict:
    return {
        "method": conversation.method,
        "layers": ", ".join(str(layer) for layer in conversation.intervention_layers),
        "temperature": conversation.temperature,
        "max_tokens": conversation.max_tokens,
    }


def steering_changes(previous, run) -> list[str]:
    """What this turn's steering changed from the previous turn's, in words: "#1681 coefficient 4 → 8"."""
    if previous is None:
        return []
    changes = []
    before = {item["feature_id"]: item["coefficient"] for item in previous.features}
    after = {item["feature_id"]: item["coefficient"] for item in run.features}
    for index in sorted(before.keys() | after.keys()):
        if index not in after:
            changes.append(f"#{index} removed")
        elif index not in before:
            changes.append(f"#{index} added at {after[index]:g}")
        elif before[index] != after[index]:
            changes.append(f"#{index} coefficient {before[index]:g} → {after[index]:g}")
    if previous.method != run.method:
        changes.append(f"method {previous.method} → {run.method}")
    for name, label in (("temperature", "temperature"), ("max_tokens", "max tokens")):
        if getattr(previous, name) != getattr(run, name):
            changes.append(f"{label} {getattr(previous, name):g} → {getattr(run, name):g}")
    if previous.intervention_layers != run.intervention_layers:
        changes.append(f"layers {_layers(previous)} → {_layers(run)}")
    return changes


def _layers(run) -> str:
    return ", ".join(f"L{layer}" for layer in run.intervention_layers)


def compact_metrics(run) -> dict | None:
    """The turn's metrics in one line: KL, perplexity Δ, similarity, overlap, and the features that fired."""
    cards = presenters.metric_cards(run) if run.status == run.Status.COMPLETED else None
    if cards is None:
        return None
    return {**cards, "fired": [item for item in cards["activations"] if item["moved"] == "wanted"]}
