import os

from django.core.asgi import get_asgi_application

from steerproject.daphne_requests import leave_form_parsing_to_django

leave_form_parsing_to_django()

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "steerproject.settings")
django_asgi_app = get_asgi_application()  # set up Django before importing consumers

from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

if settings.STEERLAB_SERVE_STATIC:
    django_asgi_app = ASGIStaticFilesHandler(django_asgi_app)

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from steering_app import routing  # noqa: E402
from steering_app.worker import StartEmbeddedWorker  # noqa: E402

application = StartEmbeddedWorker(
    ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(routing.websocket_urlpatterns))),
        "channel": ChannelNameRouter(routing.worker_channels),
    }
)
)
