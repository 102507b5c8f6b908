"""Conversations: a chat with the unsteered and the steered assistant side by side over many turns.

Each turn is a SteeringRun (conversation, turn): its prompt is the user's message, its steering the settings it
used, its outputs the two replies. Regenerating a turn adds another run with the same turn number; the latest
one is the turn's current run, the one later turns read as history (conversation_history.row_messages).
"""

from django.conf import settings
from django.db import models, transaction
from django.db.models import Q
from django.utils import timezone

from steering_app import streaming
from steering_app.errors import Conflict, Forbidden
from steering_app.models.choices import RunStatus
from steering_app.models.steering_config import SteeringConfig, steering_constraints


class ConversationQuerySet(models.QuerySet):
    def visible_to(self, user) -> "ConversationQuerySet":
        """The runs' access rule (SteeringRunQuerySet.visible_to): lab-visible unless private."""
        if not user.is_authenticated:
            return self.none()
        return self if user.is_staff else self.filter(Q(private=False) | Q(owner=user))


class Conversation(SteeringConfig):
    """Its steering fields are the settings of the next turn: those it was created with, as each message that
    changed them left them."""

    objects = ConversationQuerySet.as_manager()

    class HistoryMode(models.TextChoices):
        # Each side reads its own earlier replies: the steered assistant sees what it said steered.
        SEPARATE = "separate"
        # Both sides read the unsteered replies: each turn shows the steering's effect on that turn alone.
        SHARED = "shared"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    training = models.ForeignKey("Training", on_delete=models.PROTECT, related_name="conversations")
    system_prompt = models.TextField(blank=True)
    history_mode = models.CharField(max_length=10, choices=HistoryMode.choices, default=HistoryMode.SEPARATE)
    private = models.BooleanField(
        default=False, help_text="Readable only by its owner and staff; otherwise by every lab member"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at", "-id"]
        indexes = [models.Index(fields=["owner", "-updated_at"], name="conversation_owner_updated")]
        constraints = [
            *steering_constraints("conversation"),
            models.CheckConstraint(
                condition=Q(history_mode__in=["separate", "shared"]), name="conversation_history_mode_valid"
            ),
        ]

    def __str__(self):
        return f"Conversation {self.pk}"

    def turns(self) -> list:
        """The current run of each turn, by turn: a regenerated turn's latest run (the highest id)."""
        current = {}
        for run in self.runs.select_related("training").order_by("turn", "id"):
            current[run.turn] = run
        return list(current.values())

    def turn_in_progress(self):
        """The queued or running turn, if any: one at a time, since the next turn reads its replies."""
        return self.runs.filter(status__in=(RunStatus.QUEUED, RunStatus.RUNNING)).order_by("-id").first()

    def can_change(self, user) -> bool:
        """Only the owner or staff send, stop, regenerate, share or delete; other members read it."""
        return user.is_authenticated and (user.is_staff or user.pk == self.owner_id)

    def check_can_change(self, user, action: str) -> None:
        if not self.can_change(user):
            raise Forbidden(f"Only the conversation's owner or staff can {action}.", "conversation_id")

    def set_private(self, user, private: bool) -> None:
        """Keep it and its turns to its owner and staff, or share them with the lab (owner or staff only)."""
        self.check_can_change(user, "change who can read it")
        Conversation.objects.filter(pk=self.pk).update(private=private)
        self.runs.update(private=private)
        self.private = private
        if private:
            # As SteeringRun.set_private: members watching the turn in progress stop reading it now.
            active = self.turn_in_progress()
            if active is not None:
                transaction.on_commit(
                    lambda: streaming.publish(active.pk, streaming.ACCESS_CHANGED, {}), robust=True
                )

    def delete_by(self, user) -> None:
        """Delete it with every turn (owner or staff only); a turn in progress must be stopped first."""
        self.check_can_change(user, "delete it")
        if self.turn_in_progress() is not None:
            raise Conflict(
                f"Conversation {self.pk} has a turn in progress: stop it before deleting the conversation.",
                "conversation_id",
            )
        self.delete()
