from django.urls import path

from presets_app import views

# (route, view, name): the panel's preset section and what its buttons and forms post to.
ROUTES = (
    ("section/", views.section, "presets-section"),
    ("save/", views.save, "presets-save"),
    ("<int:pk>/favorite/", views.favorite, "presets-favorite"),
    ("<int:pk>/delete/", views.delete, "presets-delete"),
    ("export/", views.export, "presets-export"),
    ("import/", views.import_file, "presets-import"),
)
urlpatterns = [path(route, view, name=name) for route, view, name in ROUTES]
