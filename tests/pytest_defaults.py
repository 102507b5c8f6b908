"""pytest plugin loaded with -p before pytest-django sets Django up (see pyproject.toml addopts)."""

import os

# The suite must never depend on the developer's shell: a key, no hub access (a miss fails fast instead of
# hanging on the network), and runs executed in the submitting thread unless a test picks another mode.
os.environ.setdefault("SECRET_KEY", "test-only-secret-key")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("STEERLAB_WORKER_MODE", "inline")
