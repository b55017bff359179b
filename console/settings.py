"""Django settings of the console, from TRACECODE_CONSOLE_* environment variables.

SQLite in the data directory by default, so `tracecode console` starts with nothing else
installed; PostgreSQL in production by setting TRACECODE_CONSOLE_DATABASE_URL to a
postgresql:// URL. Chinese UI by default (LANGUAGE_CODE zh-hans).
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

env = os.environ.get

DATA_DIR = Path(env("TRACECODE_CONSOLE_DATA_DIR", "tracecode-console-data")).resolve()


def _secret_key() -> str:
    """The key Django signs sessions and CSRF tokens with: the setting, else a file in the data
    directory made on first start (0600), so restarts keep users logged in."""
    if env("TRACECODE_CONSOLE_SECRET_KEY"):
        return os.environ["TRACECODE_CONSOLE_SECRET_KEY"]
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    path = DATA_DIR / "secret_key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


def database_from_url(url: str) -> dict:
    """sqlite:///path (or sqlite:///:memory:) | postgresql://user:password@host:port/name?opt=v."""
    u = urlparse(url)
    if u.scheme == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": unquote(u.path[1:]) if u.path else ":memory:"}
    if u.scheme in ("postgres", "postgresql"):
        return {"ENGINE": "django.db.backends.postgresql", "NAME": unquote(u.path.lstrip("/")),
                "USER": unquote(u.username or ""), "PASSWORD": unquote(u.password or ""),
                "HOST": u.hostname or "", "PORT": str(u.port or ""),
                "OPTIONS": {k: v[-1] for k, v in parse_qs(u.query).items()}, "CONN_MAX_AGE": 60}
    raise ValueError(f"TRACECODE_CONSOLE_DATABASE_URL: unsupported scheme {u.scheme!r} "
                     "(sqlite:///path or postgresql://user@host:port/name)")


BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = _secret_key()
DEBUG = env("TRACECODE_CONSOLE_DEBUG", "") == "1"
ALLOWED_HOSTS = [h for h in env("TRACECODE_CONSOLE_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",") if h]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "tracecode.console.ledger",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files straight from the package (no separate web server needed for the console).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "tracecode.console.urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
        "tracecode.console.ledger.views.roles_context",
    ]},
}]
WSGI_APPLICATION = "tracecode.console.wsgi.application"

DATABASES = {"default": database_from_url(
    env("TRACECODE_CONSOLE_DATABASE_URL", f"sqlite:///{DATA_DIR / 'console.sqlite3'}"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "lead-list"
LOGOUT_REDIRECT_URL = "login"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_AGE = 8 * 3600  # one working day
SESSION_COOKIE_SECURE = env("TRACECODE_CONSOLE_SECURE_COOKIES", "") == "1"
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

LANGUAGE_CODE = env("TRACECODE_CONSOLE_LANGUAGE", "zh-hans")
LANGUAGES = [("zh-hans", "简体中文"), ("en", "English")]
TIME_ZONE = env("TRACECODE_CONSOLE_TIMEZONE", "Asia/Shanghai")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env("TRACECODE_CONSOLE_STATIC_ROOT") or None  # only for collectstatic behind another server
WHITENOISE_USE_FINDERS = True  # serve from the app's static/ without a collectstatic step
WHITENOISE_AUTOREFRESH = DEBUG

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env("TRACECODE_CONSOLE_LOG_LEVEL", "WARNING")},
}

# --- tracecode ---------------------------------------------------------------------------
# The tracecode gRPC service (Admin API for sanctions, GetCodeHistory for packs).
TRACECODE_SERVER = env("TRACECODE_CONSOLE_SERVER", "127.0.0.1:50051")
TRACECODE_TOKEN_FILE = env("TRACECODE_CONSOLE_TOKEN_FILE", "")  # bearer token (auth = token)
TRACECODE_RPC_TIMEOUT_S = float(env("TRACECODE_CONSOLE_RPC_TIMEOUT_S", "3"))
# Pending sanction calls are retried this often (seconds) by the serve process's retry loop.
TRACECODE_RETRY_INTERVAL_S = float(env("TRACECODE_CONSOLE_RETRY_INTERVAL_S", "5"))
# The deployment's pseudonym key (the server's and the leads engine's): one person, one pseudonym.
PSEUDONYM_KEY_FILE = env("TRACECODE_PSEUDONYM_KEY_FILE", str(DATA_DIR / "pseudonym.key"))
