"""What each side of a conversation's turn reads: the chat messages before the model's chat template.

The engine side (services.start) renders them through the template and runs them; conversations.py measures them
to refuse a history the worker's slots cannot hold. Only models are read here, so both may import it.
"""

from steering_app.models import SteeringRun


def row_messages(run: SteeringRun) -> tuple[list[dict], list[dict]]:
    """The chat messages the clean and the steered side read for this turn: [{"role", "content"}].

    The system prompt first when there is one; then each earlier current turn's user message and that side's
    reply (separate mode: each side its own reply; shared mode: both the unsteered one); last this turn's user
    message. A cancelled turn gives the text it kept; a failed one gives nothing, user message included, so that
    a conversation goes on after a failure. ValueError when the run is not a turn of a conversation.
    """
    if run.conversation_id is None:
        raise ValueError(f"Run {run.pk} is not a turn of a conversation.")
    conversation = run.conversation
    shared = conversation.history_mode == conversation.HistoryMode.SHARED
    clean, steered = [], []
    if conversation.system_prompt:
        clean.append({"role": "system", "content": conversation.system_prompt})
        steered.append({"role": "system", "content": conversation.system_prompt})
    for earlier in conversation.turns():
        if earlier.turn >= run.turn:
            break
        if earlier.status == SteeringRun.Status.FAILED:
            continue
        clean += [user(earlier.prompt), assistant(earlier.unsteered_output)]
        steered_reply = earlier.unsteered_output if shared else earlier.steered_output
        steered += [user(earlier.prompt), assistant(steered_reply)]
    return [*clean, user(run.prompt)], [*steered, user(run.prompt)]


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}
