"""A conversation's life: create, send a message, regenerate the last turn, continue from a turn, stop a turn.

Each turn is a run (runs.py decides its life); this module decides which run a message makes: its turn number,
its settings (the conversation's, changed by the message), and whether its history fits the worker's slots.
"""

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.db import transaction

from steering_app import runs, services
from steering_app.conversation_history import row_messages
from steering_app.errors import Conflict, InvalidInput
from steering_app.limits import MAX_PROMPT_CHARS
from steering_app.models import Conversation, SteeringRun, Training
from steering_app.models.steering_config import STEERING_FIELDS
from steering_app.steering_settings import SteeringSettings, is_integer

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser as User

# What a message may change from its turn on; a conversation steers one variant, so no sweep.
CHANGEABLE = ("features", "intervention_layers", "method", "temperature", "max_tokens")


@dataclass(frozen=True)
class ConversationRequest:
    training_id: int
    settings: SteeringSettings
    system_prompt: str = ""
    history_mode: str = Conversation.HistoryMode.SEPARATE
    model_id: int | None = None
    private: bool = False


def create(owner: "User", request: ConversationRequest) -> Conversation:
    """Validate a request and store the conversation with the settings of its first turn; nothing is written
    when it is invalid."""
    training = Training.objects.get_completed(request.training_id, request.model_id)
    if request.history_mode not in Conversation.HistoryMode.values:
        raise InvalidInput("history_mode must be separate or shared.", "history_mode")
    if not isinstance(request.system_prompt, str) or len(request.system_prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(
            f"The system prompt is longer than {MAX_PROMPT_CHARS} characters.", "system_prompt"
        )
    if request.settings.sweep is not None:
        raise InvalidInput("A conversation steers one variant: leave sweep out.", "sweep")
    steering = request.settings.validate(training)
    services.check_steering_scales(training, steering.features)
    check_chat_template(training)
    return Conversation.objects.create(
        owner=owner,
        training=training,
        system_prompt=request.system_prompt,
        history_mode=request.history_mode,
        private=bool(request.private),
        chat=True,
        **steering.as_fields(),
    )


def check_chat_template(training: Training) -> None:
    """A conversation needs the model's chat template to tell the turns apart."""
    try:
        services.prompt_token_count(training, "x", chat=True)
    except InvalidInput as error:
        if error.field != "chat":
            raise
        raise InvalidInput(
            f"Training {training.pk}'s model {training.model.name} has no chat template: it cannot hold a "
            "conversation.",
            "training_id",
        ) from error


def settings_of(record: Conversation | SteeringRun) -> SteeringSettings:
    """The steering a conversation's next turn uses, or the one a turn used."""
    return SteeringSettings.from_fields({name: getattr(record, name) for name in STEERING_FIELDS})


def send(
    conversation: Conversation,
    user: "User",
    content: str,
    seed: int | None = None,
    changes: dict | None = None,
) -> SteeringRun:
    """The next turn: the user's message answered with the conversation's settings, changed by `changes` (any of
    CHANGEABLE) from this turn on. The run is created and submitted; the conversation keeps the changed
    settings only when the turn was created."""
    conversation.check_can_change(user, "send a message")
    check_idle(conversation)
    if not isinstance(content, str) or not content.strip():
        raise InvalidInput("Enter a message.", "content")
    if len(content) > MAX_PROMPT_CHARS:
        raise InvalidInput(f"The message is longer than {MAX_PROMPT_CHARS} characters.", "content")
    unknown = sorted(set(changes or {}) - set(CHANGEABLE))
    if unknown:
        raise InvalidInput(f"A message cannot change {unknown[0]}.", unknown[0])
    fields = {name: getattr(conversation, name) for name in STEERING_FIELDS}
    fields.update({name: value for name, value in (changes or {}).items() if value is not None})
    steering = SteeringSettings.from_fields(fields).validate(conversation.training)
    turns = conversation.turns()
    turn = turns[-1].turn + 1 if turns else 1
    with transaction.atomic():
        run = _add_turn(conversation, turn, content, steering, seed)
        for name, value in steering.as_fields().items():
            setattr(conversation, name, value)
        conversation.save(update_fields=[*CHANGEABLE, "updated_at"])
    runs.submit(run)
    return run


def regenerate(conversation: Conversation, user: "User", seed: int | None = None) -> SteeringRun:
    """The last turn again, with its message and settings and another seed (random when not given): a new run
    with the same turn number, which becomes the turn's current run."""
    conversation.check_can_change(user, "regenerate a turn")
    check_idle(conversation)
    turns = conversation.turns()
    if not turns:
        raise Conflict(f"Conversation {conversation.pk} has no turn to regenerate yet.", "conversation_id")
    last = turns[-1]
    if seed is None:
        seed = random.randrange(2**31 - 1)
        seed += seed >= last.seed  # uniform over the others: the same seed would give the same replies
    elif seed == last.seed:
        raise InvalidInput(f"Turn {last.turn} already used seed {seed}: regenerate with another.", "seed")
    steering = settings_of(last).validate(conversation.training)
    with transaction.atomic():
        run = _add_turn(conversation, last.turn, last.prompt, steering, seed)
        conversation.save(update_fields=["updated_at"])  # the lists show the latest conversations first
    runs.submit(run)
    return run


def continue_from(conversation: Conversation, user: "User", turn: object) -> Conversation:
    """A new conversation of `user` holding copies of the current turns 1..turn that have finished (new runs
    with the same fields and outputs, shared with the lab), with the system prompt, history mode and training,
    and the settings of that turn: the next turn goes on from where it was. Any member who reads it may."""
    turns = conversation.turns()
    if not is_integer(turn) or not turns or not 1 <= turn <= turns[-1].turn:
        last = turns[-1].turn if turns else 0
        raise InvalidInput(f"turn must be between 1 and {last}, the turns of the conversation.", "turn")
    kept = [run for run in turns if run.turn <= turn and run.is_finished]
    source = kept[-1] if kept else conversation
    with transaction.atomic():
        copy = Conversation.objects.create(
            owner=user,
            training=conversation.training,
            system_prompt=conversation.system_prompt,
            history_mode=conversation.history_mode,
            chat=True,
            **{name: getattr(source, name) for name in CHANGEABLE},
        )
        for run in kept:
            run.pk = None
            run._state.adding = True
            run.owner, run.private, run.conversation = user, False, copy
            run.save()
    return copy


def cancel(conversation: Conversation, user: "User") -> SteeringRun:
    """Stop the turn in progress; it keeps the text so far and the conversation goes on after it."""
    conversation.check_can_change(user, "stop a turn")
    run = conversation.turn_in_progress()
    if run is None:
        raise Conflict(f"Conversation {conversation.pk} has no turn in progress.", "conversation_id")
    runs.cancel(run.pk, f"stopped by {user.get_username()}")
    run.refresh_from_db()
    return run


def check_idle(conversation: Conversation) -> None:
    """One turn at a time: the next one reads this one's replies."""
    active = conversation.turn_in_progress()
    if active is not None:
        raise Conflict(
            f"Turn {active.turn} of conversation {conversation.pk} is still {active.status}: wait for it or "
            "stop it.",
            "conversation_id",
        )


def _add_turn(
    conversation: Conversation, turn: int, content: str, steering: SteeringSettings, seed: int | None
) -> SteeringRun:
    """The turn's run, queued and not yet submitted, once its history fits the worker's slots."""
    draft = SteeringRun(conversation=conversation, turn=turn, prompt=content)
    check_history_fits(conversation.training, row_messages(draft), steering.max_tokens)
    run = runs.create(
        conversation.owner,
        runs.RunRequest(
            training_id=conversation.training_id,
            prompt=content,
            settings=steering,
            seed=seed,
            chat=True,
            private=conversation.private,
        ),
    )
    run.conversation, run.turn = conversation, turn
    run.save(update_fields=["conversation", "turn"])
    return run


def check_history_fits(training: Training, sides: tuple[list[dict], list[dict]], max_tokens: int) -> None:
    """The longer side's history and max_tokens must fit one slot. A history that does not is refused, never
    shortened: dropping turns silently would change what the assistant answers to."""
    count = max(services.history_token_count(training, messages) for messages in sides)
    if max_tokens > services.room_for_new_tokens(count):
        raise InvalidInput(
            f"The conversation's history is {count} tokens; with max_tokens {max_tokens} it exceeds the worker's "
            f"{services.slot_tokens()}-token slots (STEERLAB_SLOT_TOKENS). Start a new conversation, or continue "
            "from an earlier turn.",
            "content",
        )
