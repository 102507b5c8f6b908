"""SteerLab settings: one file, driven by environment variables (see README, "Configuration").

With no variables set this is the embedded default: SQLite under the data dir, an in-memory channel layer
and a worker thread inside the daphne process. DATABASE_URL and REDIS_URL switch to the lab deployment.
"""

import os
from pathlib import Path

from steerproject import env, private_files

BASE_DIR = Path(__file__).resolve().parent.parent
ENV = os.environ

DEBUG = env.env_bool(ENV, "DEBUG", default=False)
STEERLAB_DATA_DIR = env.data_dir(ENV, BASE_DIR)
private_files.make_private_dir(STEERLAB_DATA_DIR)
SECRET_KEY = env.secret_key(ENV, DEBUG, STEERLAB_DATA_DIR)
ALLOWED_HOSTS = env.env_list(ENV, "ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.env_list(ENV, "CSRF_TRUSTED_ORIGINS", [])

# Where train_sae and calibrate_features may read a corpus (steering_app/dataset_roots.py).
STEERLAB_DATASET_DIRS = env.dataset_dirs(ENV)
STEERLAB_DEVICE = env.device(ENV)
STEERLAB_DTYPE = env.dtype(ENV)
STEERLAB_MAX_NEW_TOKENS = env.env_int(ENV, "STEERLAB_MAX_NEW_TOKENS", default=512)
STEERLAB_RUN_TIMEOUT = env.env_int(ENV, "STEERLAB_RUN_TIMEOUT", default=120)
STEERLAB_RUN_MAX_SECONDS = env.env_int(ENV, "STEERLAB_RUN_MAX_SECONDS", default=60)
# Runs one member may have waiting in the queue at once; one more is refused with 429 (fair share: runs are
# taken round-robin across members, so a backlog delays only its own member).
STEERLAB_MAX_QUEUED_PER_MEMBER = env.env_int(ENV, "STEERLAB_MAX_QUEUED_PER_MEMBER", default=8)
# Outputs one experiment may ask for: conditions x prompts x seeds x strengths.
STEERLAB_MAX_EXPERIMENT_OUTPUTS = env.env_int(ENV, "STEERLAB_MAX_EXPERIMENT_OUTPUTS", default=2000)
# daphne serves /static/ itself unless a front proxy does (set STEERLAB_SERVE_STATIC=0 behind nginx).
STEERLAB_SERVE_STATIC = env.env_bool(ENV, "STEERLAB_SERVE_STATIC", default=True)
# The sentence embedder of the metrics: a sentence-transformers id or directory; empty: the bundled one.
STEERLAB_EMBEDDER = ENV.get("STEERLAB_EMBEDDER", "").strip()
# A worker's batch: rows (a run takes 1 + its variants) and cache tokens (prompt + new tokens); None: the
# device's default, 8 x 512 on a CPU and 32 x 1024 on a GPU. The web tier checks requests against the same
# numbers (steering_settings.slot_shape), reading the device's kind from STEERLAB_DEVICE.
STEERLAB_SLOT_ROWS = env.slot_size(ENV, "STEERLAB_SLOT_ROWS")
STEERLAB_SLOT_TOKENS = env.slot_size(ENV, "STEERLAB_SLOT_TOKENS")
# A CUDA decode step as one graph launch (off: every kernel launched from Python, to compare or debug).
STEERLAB_CUDA_GRAPHS = env.env_bool(ENV, "STEERLAB_CUDA_GRAPHS", default=True)
# How long a conversation's rows keep their KV in a worker's batch after a turn, unless rows run short first.
STEERLAB_CHAT_KEEP_SECONDS = env.env_int(ENV, "STEERLAB_CHAT_KEEP_SECONDS", default=600, minimum=0)
STEERLAB_WORKER_MODE = env.worker_mode(ENV)
# STEERLAB_STEP_LEAN / _KERNEL / _ROWS: the worker's slot-step policy (engine/serving/plan.py StepPolicy).
STEERLAB_STEP_POLICY = env.step_policy(ENV)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "ninja",  # /api/docs then serves Swagger UI from ninja's bundled static files, not from a CDN
    # Before channels: steering_app's runworker (it adds the stale-run sweep) overrides channels' own.
    "steering_app",
    "channels",
    "presets_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "steerproject.content_security_policy.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

STEERLAB_SECURE_COOKIES = env.env_bool(ENV, "STEERLAB_SECURE_COOKIES", default=False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = STEERLAB_SECURE_COOKIES
if STEERLAB_SECURE_COOKIES:
    # Secure cookies mean HTTPS at a proxy in front of daphne; the proxy must set X-Forwarded-Proto
    # (overwriting any a client sent) so that Django knows the request was secure.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_HSTS_SECONDS = env.env_int(ENV, "STEERLAB_HSTS_SECONDS", default=0, minimum=0)

ROOT_URLCONF = "steerproject.urls"
ASGI_APPLICATION = "steerproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env.database(ENV, STEERLAB_DATA_DIR)}
CHANNEL_LAYERS = env.channel_layers(ENV)
CACHES = env.caches(ENV)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
# Login throttling (steerproject/login_throttle.py): this many failures of one username from one address, or
# of any usernames from one address, within the window lock them out for the window's length. The address's
# limit is looser so that members behind one NAT do not lock each other out.
STEERLAB_LOGIN_MAX_FAILURES = env.env_int(ENV, "STEERLAB_LOGIN_MAX_FAILURES", default=5)
STEERLAB_LOGIN_MAX_ADDRESS_FAILURES = env.env_int(
    ENV, "STEERLAB_LOGIN_MAX_ADDRESS_FAILURES", default=4 * STEERLAB_LOGIN_MAX_FAILURES
)
STEERLAB_LOGIN_WINDOW_SECONDS = env.env_int(ENV, "STEERLAB_LOGIN_WINDOW_SECONDS", default=900)
LOGIN_REDIRECT_URL = "/steering/"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = STEERLAB_DATA_DIR / "static"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {"steering_app": {"level": "INFO"}, "presets_app": {"level": "INFO"}},
}
