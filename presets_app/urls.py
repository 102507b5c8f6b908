from django.urls import path

from presets_app import views

urlpatterns = [
    path("section/", views.section, name="presets-section"),
    path("save/", views.save, name="presets-save"),
    path("<int:pk>/favorite/", views.favorite, name="presets-favorite"),
    path("<int:pk>/delete/", views.delete, name="presets-delete"),
    path("export/", views.export, name="presets-export"),
    path("import/", views.import_file, name="presets-import"),
]
