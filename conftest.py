import os

# The suite needs a key and must never depend on the developer's shell.
os.environ.setdefault("SECRET_KEY", "test-only-secret-key")
