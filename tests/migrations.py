"""Migration tests: move the test database's schema to given migrations and get their models."""

from django.db import connection
from django.db.migrations.executor import MigrationExecutor


def migrate(targets):
    """The schema at targets ([(app, migration)]); the apps registry of that state, for its historical models."""
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


def migrate_to_latest():
    migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())
