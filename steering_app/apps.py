from django.apps import AppConfig


class SteeringAppConfig(AppConfig):
    name = "steering_app"
    verbose_name = "Steering"

    def ready(self):
        from django.conf import settings
        from django.db.backends.signals import connection_created

        from steering_app import engine_config, wake, worker
        from steerproject.private_files import make_sqlite_files_private

        connection_created.connect(make_sqlite_files_private, dispatch_uid="steerlab-private-sqlite")
        # The engine imports nothing from Django: it gets its settings here, once.
        engine_config.configure_from(settings)
        wake.install(worker.submit)
