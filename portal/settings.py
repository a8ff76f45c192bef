"""Bulkhead settings: 12-factor, every knob is an environment variable (documented in README.md).

Embedded default: SQLite and a secret key under BULKHEAD_DATA_DIR (var/), Redis on loopback.
`BULKHEAD_PROFILE=production` turns on the hardened settings that `manage.py check --deploy` wants.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


DATA_DIR = Path(env("BULKHEAD_DATA_DIR", str(BASE_DIR / "var"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)
PROFILE = env("BULKHEAD_PROFILE", "development")
PRODUCTION = PROFILE == "production"


def _secret_key() -> str:
    """Keep one generated key under the data dir unless the environment supplies one."""
    if key := env("BULKHEAD_SECRET_KEY"):
        return key
    path = DATA_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(64))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
# Debug pages (the whole URL map, settings, tracebacks) only on request, never in production and never
# when the web server listens beyond loopback (BULKHEAD_BIND, set by `make run`).
BULKHEAD_BIND = env("BULKHEAD_BIND", "127.0.0.1")
LOOPBACK_BINDS = {"127.0.0.1", "::1", "localhost"}
DEBUG = env_bool("BULKHEAD_DEBUG", False) and not PRODUCTION and BULKHEAD_BIND in LOOPBACK_BINDS
ALLOWED_HOSTS = [h for h in env("BULKHEAD_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",") if h]
CSRF_TRUSTED_ORIGINS = [o for o in env("BULKHEAD_CSRF_TRUSTED_ORIGINS", "").split(",") if o]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "channels",
    "portal",
    "tenants",
    "imaging",
    "compute",
    "volumes",
    "backups",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "portal.middleware.RequestIdMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "frontend.middleware.CurrentTenantMiddleware",
]

ROOT_URLCONF = "portal.urls"
ASGI_APPLICATION = "portal.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "frontend.context.current_tenant",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env("DATABASE_URL", f"sqlite:///{DATA_DIR / 'bulkhead.sqlite3'}"),
        conn_max_age=env_int("BULKHEAD_DB_CONN_MAX_AGE", 60),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (web, worker, beat) share the embedded database: wait for locks, don't fail.
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # A file, not memory: tests start real worker processes that must see the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if PRODUCTION
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = not PRODUCTION


def _embedded_redis_password() -> str:
    """The embedded Redis's password, generated once under the data dir like the secret key."""
    path = DATA_DIR / "redis_password"
    if not path.exists():
        # Hex only: it goes into a URL and a redis.conf line without quoting.
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


# The embedded default (`make run`) always has a password; deployments give a URL with one.
REDIS_URL = env("REDIS_URL") or f"redis://:{_embedded_redis_password()}@127.0.0.1:6379/0"
# A joined host's agent.env names its own broker user (`redis://h.<hex>@broker/0`) and holds its credential
# once: that credential is the user's password (compute.broker_access).
if env("BULKHEAD_HOST_CREDENTIAL"):
    from compute.host.broker import url_with_credential

    REDIS_URL = url_with_credential(REDIS_URL, env("BULKHEAD_HOST_CREDENTIAL"))

CACHES = {
    "default": {
        # Django's RedisCache, its connections shared by the per-request cache objects (portal/cache.py).
        "BACKEND": "portal.cache.SharedPoolRedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "bulkhead",
        # JSON, never pickle: a value written into Redis must not become code in the portal.
        "OPTIONS": {"serializer": "portal.cache.JSONSerializer"},
    }
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": "bulkhead:ws"},
    }
}

# Celery: the settings every worker runs with, the portal's and each host's own (compute.host.worker), in
# one Django-free place: JSON only, late acks, a lost worker puts the message back, time limits.
from compute.host import celery_settings as _celery_settings  # noqa: E402

globals().update(_celery_settings.django_names(_celery_settings.shared()))
CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = dict(_celery_settings.shared()["broker_transport_options"])
# A host's worker under `make run` (the portal's codebase): every key it touches (its queue and kombu's
# unacked bookkeeping) under the host's own prefix, the only keys its broker user may touch; remote
# control and events off, as on a joined host's own worker.
BULKHEAD_BROKER_KEYPREFIX = env("BULKHEAD_BROKER_KEYPREFIX")
if BULKHEAD_BROKER_KEYPREFIX:
    from compute.host.broker import is_key_prefix

    if not is_key_prefix(BULKHEAD_BROKER_KEYPREFIX):
        raise ImproperlyConfigured("BULKHEAD_BROKER_KEYPREFIX must be h.<host hex>:")
    CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"] = BULKHEAD_BROKER_KEYPREFIX
    globals().update(_celery_settings.django_names(_celery_settings.HOST_WORKER))

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenants.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "portal.api.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "django_filters.rest_framework.DjangoFilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "portal.api.errors.exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Bulkhead API",
    "DESCRIPTION": "Self-hosted private cloud: tenants, images, workloads, compartments, desired state.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# Failed authentications per client address and credential (token prefix) a minute before the API
# answers 429 for that pair. The client address is REMOTE_ADDR unless it is a trusted proxy (CIDRs,
# comma-separated), whose BULKHEAD_CLIENT_IP_HEADER then names the client.
BULKHEAD_AUTH_FAILURES_PER_MINUTE = env_int("BULKHEAD_AUTH_FAILURES_PER_MINUTE", 20)
BULKHEAD_TRUSTED_PROXIES = [p.strip() for p in env("BULKHEAD_TRUSTED_PROXIES", "").split(",") if p.strip()]
BULKHEAD_CLIENT_IP_HEADER = env("BULKHEAD_CLIENT_IP_HEADER", "X-Forwarded-For")
BULKHEAD_OPERATOR_EMAIL = env("BULKHEAD_OPERATOR_EMAIL", "admin@localhost")
BULKHEAD_HOST_NAME = env("BULKHEAD_HOST_NAME", "local")
# A joined host: the portal it fetches missing image blobs from, with its own credential (issue 16).
BULKHEAD_PORTAL_URL = env("BULKHEAD_PORTAL_URL")
BULKHEAD_HOST_CREDENTIAL = env("BULKHEAD_HOST_CREDENTIAL")
# The broker address handed to hosts that join (one the hosts can reach); empty: not handed out. A
# database URL is never handed out (session 14): BULKHEAD_AGENT_DATABASE_URL only names a host to protect.
BULKHEAD_AGENT_DATABASE_URL = env("BULKHEAD_AGENT_DATABASE_URL")
BULKHEAD_AGENT_REDIS_URL = env("BULKHEAD_AGENT_REDIS_URL")
# How often host agents sample their workloads and themselves (history and /metrics).
BULKHEAD_SAMPLE_SECONDS = float(env("BULKHEAD_SAMPLE_SECONDS", "10"))
# Hosts create a new container while its claim is answered, from the spec its message carries (a workload
# with no secret value, compartment or volume); "0": after the claim only (compute.host.tasks).
BULKHEAD_CREATE_AHEAD = env("BULKHEAD_CREATE_AHEAD", "1") != "0"
BULKHEAD_STORE_DIR = Path(env("BULKHEAD_STORE_DIR", str(DATA_DIR / "store")))
# The guest kernel and initramfs are build artefacts of the checkout (`make guest`), not data: they stay
# where the Makefile builds them whatever BULKHEAD_DATA_DIR says.
BULKHEAD_GUEST_DIR = Path(env("BULKHEAD_GUEST_DIR", str(BASE_DIR / "var" / "guest")))
# Host ids handed out to containers' user namespaces, 65,536 per container: "start,count". Reserve the
# same range in /etc/subuid and /etc/subgid (root:1000000:1000000000) so no other tool uses it.
BULKHEAD_USERNS_POOL = tuple(
    int(part) for part in env("BULKHEAD_USERNS_POOL", "1000000,1000000000").split(",")
)
# Volumes (issue 17): a host's volume pool. Empty: an embedded pool, a sparse loop-mounted btrfs image of
# BULKHEAD_VOLUME_POOL_GIB under the host's state dir, made when first needed. Else the path of a mounted
# btrfs filesystem (a real device) with quotas enabled (`btrfs quota enable PATH`).
BULKHEAD_VOLUME_POOL = env("BULKHEAD_VOLUME_POOL")
# The backup store (deduplicated chunks and manifests, issue 17); hosts without it fetch chunks through
# the portal's host API.
BULKHEAD_BACKUP_DIR = Path(env("BULKHEAD_BACKUP_DIR", str(DATA_DIR / "backups")))
BULKHEAD_VOLUME_POOL_GIB = env_int("BULKHEAD_VOLUME_POOL_GIB", 64)
BULKHEAD_MAX_UPLOAD_BYTES = env_int("BULKHEAD_MAX_UPLOAD_BYTES", 8 * 1024**3)
# Any other request body daphne reads before the application runs (portal.daphne_streaming.body_limit):
# larger ones are answered 413 before they are written anywhere. The largest legitimate bodies are a
# desired-state document (2 Mi characters, at most 12 MiB JSON-escaped) and a host's batch of chunk
# names (~4 MiB); a host's backup chunks and manifests have limits of their own.
BULKHEAD_MAX_REQUEST_BYTES = env_int("BULKHEAD_MAX_REQUEST_BYTES", 16 * 1024**2)
BULKHEAD_REGISTRY_ALLOWLIST = [r for r in env("BULKHEAD_REGISTRY_ALLOWLIST", "").split(",") if r]
BULKHEAD_REGISTRY_CA_BUNDLE = env("BULKHEAD_REGISTRY_CA_BUNDLE") or None

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("BULKHEAD_LOG_LEVEL", "INFO")},
    "loggers": {"django.channels.server": {"level": "WARNING"}},
}

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

if PRODUCTION:
    SECURE_SSL_REDIRECT = env_bool("BULKHEAD_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("BULKHEAD_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
