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
        engine_config.configure(
            data_dir=settings.STEERLAB_DATA_DIR,
            device=settings.STEERLAB_DEVICE,
            dtype=settings.STEERLAB_DTYPE,
            embedder=settings.STEERLAB_EMBEDDER,
            slot_rows=settings.STEERLAB_SLOT_ROWS,
            slot_tokens=settings.STEERLAB_SLOT_TOKENS,
            cuda_graphs=settings.STEERLAB_CUDA_GRAPHS,
            step_policy=settings.STEERLAB_STEP_POLICY,
        )
        wake.install(worker.submit)
