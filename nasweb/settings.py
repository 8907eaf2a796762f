"""The one settings module of nasweb: everything comes from the environment.

Every variable read here is listed in README.md ("Configuration"). Typed helpers
(`env_bool`, `env_int`, `env_str`, `env_secret`) raise ImproperlyConfigured on
bad values instead of silently falling back.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from exc
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be >= {minimum}")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default)
    if value not in choices:
        allowed = " or ".join(repr(choice) for choice in choices)
        raise ImproperlyConfigured(f"{name} must be {allowed}, got {value!r}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_secret(name: str, default: str) -> str:
    """``NAME`` or the contents of the file named by ``NAME_FILE`` (Docker/K8s secrets)."""
    file_name = os.environ.get(f"{name}_FILE")
    if file_name:
        try:
            return Path(file_name).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={file_name!r} cannot be read: {exc}") from exc
    return os.environ.get(name, default)


# --- Core -------------------------------------------------------------------

# Used only for development and tests; production must set its own key.
DEFAULT_SECRET_KEY = "nasweb-insecure-development-key-do-not-use-in-production"
TESTING = "pytest" in sys.modules
DEBUG = env_bool("NASWEB_DEBUG", False)
# `make run` writes a generated key to var/secret_key on first run; it is used when
# neither NASWEB_SECRET_KEY nor NASWEB_SECRET_KEY_FILE is set.
GENERATED_SECRET_KEY_FILE = VAR_DIR / "secret_key"
if (
    "NASWEB_SECRET_KEY" not in os.environ
    and "NASWEB_SECRET_KEY_FILE" not in os.environ
    and GENERATED_SECRET_KEY_FILE.is_file()
):
    os.environ["NASWEB_SECRET_KEY_FILE"] = str(GENERATED_SECRET_KEY_FILE)
SECRET_KEY = env_secret("NASWEB_SECRET_KEY", DEFAULT_SECRET_KEY)
if SECRET_KEY == DEFAULT_SECRET_KEY and not DEBUG and not TESTING:
    raise ImproperlyConfigured(
        "NASWEB_SECRET_KEY (or NASWEB_SECRET_KEY_FILE) must be set when NASWEB_DEBUG is off; "
        "`make run` generates one under var/ for you."
    )

ALLOWED_HOSTS = env_list("NASWEB_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("NASWEB_CSRF_TRUSTED_ORIGINS", [])

# Behind a TLS-terminating proxy: secure cookies, HSTS, HTTPS redirect.
BEHIND_TLS = env_bool("NASWEB_BEHIND_TLS", False)
SESSION_COOKIE_SECURE = BEHIND_TLS
CSRF_COOKIE_SECURE = BEHIND_TLS
SECURE_SSL_REDIRECT = BEHIND_TLS
SECURE_HSTS_SECONDS = 31536000 if BEHIND_TLS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = BEHIND_TLS
SECURE_HSTS_PRELOAD = BEHIND_TLS
if BEHIND_TLS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_celery_results",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI assets served locally (no CDN)
    "nasweb.core",
    "devices",
    "nasweb.runs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves static/ (incl. Plotly.js) from the app itself: the dashboard works offline, no CDN.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "nasweb.urls"
ASGI_APPLICATION = "nasweb.asgi.application"
WSGI_APPLICATION = None

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

# --- Database ---------------------------------------------------------------
# SQLite by default; DATABASE_URL=postgres://user@host:5432/name switches to PostgreSQL.

DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'nasweb.sqlite3'}")
DATABASES = {
    "default": dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("NASWEB_DB_CONN_MAX_AGE", 0))
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Worker, web server and tests share one file: wait for locks instead of failing,
    # and give tests a file (not :memory:) so a real worker process can see their rows.
    DATABASES["default"].setdefault("OPTIONS", {})
    DATABASES["default"]["OPTIONS"].update({"timeout": 30, "transaction_mode": "IMMEDIATE"})
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
if TESTING or env_bool("NASWEB_FAST_PASSWORD_HASHER", False):
    # Tests only (the worker/web processes a test starts set the variable): fast hashing.
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    "nasweb.core.staticfinders.PlotlyFinder",
]
STATIC_ROOT = VAR_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise expects it; collectstatic fills it
# Serve straight from STATICFILES_DIRS too, so a fresh checkout works before collectstatic.
WHITENOISE_USE_FINDERS = True

# --- REST API -----------------------------------------------------------------
# Token auth for scripts (`Authorization: Token <key>`), session auth (with CSRF) for the browser.
# Boards use their own device tokens on the agent endpoints only (devices/auth.py).

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "nasweb.core.pagination.HeaderLimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "nasweb API",
    "DESCRIPTION": "Devices, latency profiling, board agents, meta-training and adaption runs, adapted models.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Jobs and devices both have a "status" field with different choices; name each enum explicitly.
    "ENUM_NAME_OVERRIDES": {
        "JobStatusEnum": "nasweb.core.models.JobStatus",
        "DeviceStatusEnum": "devices.models.DeviceStatus",
    },
}

# --- Files ------------------------------------------------------------------


def _default_data_dir() -> Path:
    shared = BASE_DIR.parent / "shared" / "data"
    return shared if shared.is_dir() else VAR_DIR / "data"


NASWEB_DATA_DIR = Path(env_str("NASWEB_DATA_DIR", str(_default_data_dir()))).expanduser()
NASWEB_ARTIFACT_DIR = Path(env_str("NASWEB_ARTIFACT_DIR", str(VAR_DIR / "artifacts"))).expanduser()
NASWEB_CACHE_DIR = Path(env_str("NASWEB_CACHE_DIR", str(VAR_DIR / "cache"))).expanduser()
MEDIA_ROOT = Path(env_str("NASWEB_MEDIA_DIR", str(VAR_DIR / "media"))).expanduser()
MEDIA_URL = "/media/"
# The engine reads the same variables (engine/paths.py); keep worker processes consistent.
os.environ.setdefault("NASWEB_DATA_DIR", str(NASWEB_DATA_DIR))
os.environ.setdefault("NASWEB_ARTIFACT_DIR", str(NASWEB_ARTIFACT_DIR))
os.environ.setdefault("NASWEB_CACHE_DIR", str(NASWEB_CACHE_DIR))

NASWEB_MAX_UPLOAD_BYTES = env_int("NASWEB_MAX_UPLOAD_BYTES", 64 * 1024 * 1024, minimum=1024)
# What an uploaded support-set zip may expand to: a zip bomb is refused from its directory,
# before anything is decompressed.
NASWEB_MAX_UNZIPPED_BYTES = env_int("NASWEB_MAX_UNZIPPED_BYTES", 512 * 1024 * 1024, minimum=1024)
NASWEB_MAX_UPLOAD_FILES = env_int("NASWEB_MAX_UPLOAD_FILES", 5000, minimum=1)
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
# A request body larger than the upload limit is refused before it is read (nasweb/core/uploads.py).
FILE_UPLOAD_HANDLERS = [
    "nasweb.core.uploads.UploadSizeLimitHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]

# --- Redis, Celery, Channels ------------------------------------------------

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# At-least-once delivery: a task is acknowledged only after it finished, and a task
# whose worker died is put back on the queue. Every task is idempotent for this.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A message left unacknowledged by a killed worker comes back only after this; it must exceed the
# longest job, or a running job would be delivered twice. Recovery does not wait for it: job
# leases and the workers' recovery scan (nasweb/core/recovery.py) resume a dead worker's job.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env_int("NASWEB_VISIBILITY_TIMEOUT_S", 6 * 3600)}
# A running task keeps running through a broker outage; its job row, not the ack, records the end.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_ALWAYS_EAGER = False
# Queues a worker of `make run` consumes; a GPU machine can run `-Q train` only.
NASWEB_WORKER_QUEUES = env_list("NASWEB_WORKER_QUEUES", ["default", "train", "profile", "adapt"])
NASWEB_WORKER_CONCURRENCY = env_int("NASWEB_WORKER_CONCURRENCY", 1, minimum=1)
# Job leases (nasweb/core/recovery.py): a running job renews its lease every HEARTBEAT seconds;
# one not renewed for LEASE seconds is resumed by another worker. Workers scan for such jobs and
# for queued jobs whose message is missing from Redis (for GRACE seconds) every INTERVAL seconds.
NASWEB_JOB_HEARTBEAT_S = env_int("NASWEB_JOB_HEARTBEAT_S", 10, minimum=1)
NASWEB_JOB_LEASE_S = env_int("NASWEB_JOB_LEASE_S", 90, minimum=2)
if NASWEB_JOB_LEASE_S < 2 * NASWEB_JOB_HEARTBEAT_S:
    raise ImproperlyConfigured("NASWEB_JOB_LEASE_S must be at least twice NASWEB_JOB_HEARTBEAT_S")
NASWEB_RECOVERY_INTERVAL_S = env_int("NASWEB_RECOVERY_INTERVAL_S", 30, minimum=1)
NASWEB_LOST_MESSAGE_GRACE_S = env_int("NASWEB_LOST_MESSAGE_GRACE_S", 60, minimum=1)
# Torch threads per worker process: workers must not oversubscribe the cores.
NASWEB_TORCH_THREADS = env_int(
    "NASWEB_TORCH_THREADS", max(1, (os.cpu_count() or 1) // NASWEB_WORKER_CONCURRENCY)
)
# Where meta-training runs ("cpu" or "cuda"): set "cuda" on a deployment whose `train` workers have a
# GPU (the same value for the web process, which writes it into each run's spec). Such runs use the
# engine's vmap strategy; a worker without a GPU fails them with a clear error.
NASWEB_TRAIN_DEVICE = env_choice("NASWEB_TRAIN_DEVICE", "cpu", ("cpu", "cuda"))
# Where an adaption's search scores candidates ("cpu" or "cuda"): a worker-side setting, for a
# worker consuming `adapt` on a machine with a GPU (one search process there; packages are still
# built on the CPU). A resumed adaption keeps the device of its first attempt.
NASWEB_ADAPT_DEVICE = env_choice("NASWEB_ADAPT_DEVICE", "cpu", ("cpu", "cuda"))
# Processes that score GA candidates of one adaption in parallel (one torch thread each): the
# same share of the cores as the torch threads, unless set.
NASWEB_SEARCH_WORKERS = env_int("NASWEB_SEARCH_WORKERS", NASWEB_TORCH_THREADS, minimum=1)
# Keep each super-net's few-shot losses in a memo beside its checkpoint (engine.search.memo), so
# a later adaption of the same super-net - another device, another budget - reuses what earlier
# ones scored. Hits are the numbers a fresh evaluation gives: choices do not depend on it.
NASWEB_FITNESS_MEMO = env_bool("NASWEB_FITNESS_MEMO", True)

# Per-process memory cache (finished runs' Pareto fronts for the Compare page): no shared state is
# kept here, so nothing needs a cache server; large enough for a few thousand runs' fronts.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
        "OPTIONS": {"MAX_ENTRIES": 5000},
    }
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # channels_redis receives with a 5 s blocking BZPOPMIN, and redis-py 8 reads with a 5 s
            # socket timeout by default: an idle websocket's consumer then died every ~5 s of quiet
            # (channels_redis#422). A longer read timeout still notices a Redis that stopped answering.
            "hosts": [{"address": env_str("CHANNELS_REDIS_URL", REDIS_URL), "socket_timeout": 15}],
            "capacity": 1000,
            "expiry": 60,
        },
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("NASWEB_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
