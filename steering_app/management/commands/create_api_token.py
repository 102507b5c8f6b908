from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from steering_app.models import ApiToken


class Command(BaseCommand):
    help = "Issue an API token for a user and print it; only its hash is stored, so it cannot be shown again."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--name", default="", help="A label to tell the user's tokens apart in the admin."
        )

    def handle(self, *args, username, name, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user named {username!r}.")
        if not user.is_active:
            raise CommandError(f"User {username!r} is inactive; an inactive user's token is refused.")
        _, raw = ApiToken.issue(user, name)
        self.stdout.write(raw)
