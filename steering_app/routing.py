from django.urls import path

from steering_app import consumers

websocket_urlpatterns = [
    path("ws/steering/runs/<int:run_id>/", consumers.RunStreamConsumer.as_asgi()),
]
worker_channels = {consumers.WORKER_CHANNEL: consumers.SteeringWorkerConsumer.as_asgi()}
