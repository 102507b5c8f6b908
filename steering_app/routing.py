from django.urls import path

from steering_app import consumers, worker

websocket_urlpatterns = [
    path("ws/steering/runs/<int:run_id>/", consumers.RunStreamConsumer.as_asgi()),
    path("ws/steering/experiments/<int:experiment_id>/", consumers.ExperimentProgressConsumer.as_asgi()),
]
worker_channels = {worker.WORKER_CHANNEL: worker.SteeringWorkerConsumer.as_asgi()}
