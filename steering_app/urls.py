from django.urls import path

from steering_app import views

urlpatterns = [
    path("", views.panel, name="steering-panel"),
]
