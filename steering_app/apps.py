from django.apps import AppConfig


class SteeringAppConfig(AppConfig):
    name = "steering_app"
    verbose_name = "Steering"

    def ready(self):
        from django.db.backends.signals import connection_created

        from steerproject.private_files import make_sqlite_files_private

        connection_created.connect(make_sqlite_files_private, dispatch_uid="steerlab-private-sqlite")
