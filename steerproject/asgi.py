import os

from django.core.asgi import get_asgi_application

from steerproject.daphne_requests import leave_form_parsing_to_django

leave_form_parsing_to_django()

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "steerproject.settings")
django_asgi_app = get_asgi_application()  # set up Django before importing consumers

from django.conf import settings
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

if settings.STEERLAB_SERVE_STATIC:
    django_asgi_app = ASGIStaticFilesHandler(django_asgi_app)

from channels.auth import AuthMiddlewareStack
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator

from steering_app import routing
from steering_app.worker import StartEmbeddedWorker

application = StartEmbeddedWorker(
    ProtocolTypeRouter(
        {
            "http": django_asgi_app,
            "websocket": AllowedHostsOriginValidator(
                AuthMiddlewareStack(URLRouter(routing.websocket_urlpatterns))
            ),
            "channel": ChannelNameRouter(routing.worker_channels),
        }
    )
)
