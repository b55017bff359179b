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

import django

env = os.environ.get

DATA_DIR = Path(env("TRACECODE_CONSOLE_DATA_DIR", "tracecode-console-data")).resolve()


def _secret_key() -> str:
    """The key Django signs sessions and CSRF tokens with: the setting, else a file in the data
    directory made on first start (0600), so restarts keep users logged in."""
    if env("TRACECODE_CONSOLE_SECRET_KEY"):
        return os.environ["TRACECODE_CONSOLE_SECRET_KEY"]
    private_data_dir(DATA_DIR)
    path = DATA_DIR / "secret_key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


def private_data_dir(path: Path) -> Path:
    """The data directory holds password hashes, sessions, the secret and pseudonym keys: 0700,
    made so and kept so at every start (a directory made by an older version was 0755)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def private_sqlite_file(name: str) -> None:
    """The SQLite database 0600 before SQLite first opens it: SQLite gives its -wal and -shm
    files the database file's mode, so they are 0600 too; files an older version made are
    chmodded."""
    if name == ":memory:" or name.startswith("file:"):
        return
    fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(name + suffix):
            os.chmod(name + suffix, 0o600)


# SQLite for several threads and processes (waitress's threads, the consumer, the CLI):
# WAL lets readers go on while one writes; the busy timeout makes a writer wait for the lock
# instead of failing at once with "database is locked"; IMMEDIATE takes the write lock when a
# transaction begins (Django 5.1+), so two approvals queue up instead of both reading, then
# one failing to upgrade its lock (which no busy timeout can save: SQLite refuses it at once).
SQLITE_OPTIONS: dict[str, object] = {
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
    "timeout": float(env("TRACECODE_CONSOLE_SQLITE_TIMEOUT_S", "30")),
}
if django.VERSION >= (5, 1):  # setup.py still admits 5.0, which has no transaction_mode (it would be a TypeError)
    SQLITE_OPTIONS["transaction_mode"] = "IMMEDIATE"


def database_from_url(url: str) -> dict:
    """sqlite:///path (or sqlite:///:memory:) | postgresql://user:password@host:port/name?opt=v."""
    u = urlparse(url)
    if u.scheme == "sqlite":
        name = unquote(u.path[1:]) if u.path else ":memory:"
        if name != ":memory:":
            parent = Path(name).resolve().parent
            if parent == DATA_DIR or not parent.exists():
                private_data_dir(parent)
            private_sqlite_file(name)
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": name, "OPTIONS": dict(SQLITE_OPTIONS)}
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

# Applied wherever a password is set: the CLI (`tracecode console user`) and Django's forms.
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
     "OPTIONS": {"min_length": int(env("TRACECODE_CONSOLE_PASSWORD_MIN_LENGTH", "12"))}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Login throttling (views.ThrottledLoginForm, counters in the ledger's database so that every
# process counts alike): a user name with this many failures within the window, or an address
# with that many, is refused (the password is not even checked) until the window since the
# last failure has passed. An address is REMOTE_ADDR: behind a proxy, that is the proxy's.
TRACECODE_LOGIN_MAX_FAILURES_USER = int(env("TRACECODE_CONSOLE_LOGIN_MAX_FAILURES_USER", "5"))
TRACECODE_LOGIN_MAX_FAILURES_ADDRESS = int(env("TRACECODE_CONSOLE_LOGIN_MAX_FAILURES_ADDRESS", "20"))
TRACECODE_LOGIN_WINDOW_S = int(env("TRACECODE_CONSOLE_LOGIN_WINDOW_S", "900"))
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
# TLS to the server: its CA (connect with TLS), and the console's admin certificate (auth = mtls).
TRACECODE_TLS_CA = env("TRACECODE_CONSOLE_TLS_CA", "")
TRACECODE_TLS_CERT = env("TRACECODE_CONSOLE_TLS_CERT", "")
TRACECODE_TLS_KEY = env("TRACECODE_CONSOLE_TLS_KEY", "")
TRACECODE_RPC_TIMEOUT_S = float(env("TRACECODE_CONSOLE_RPC_TIMEOUT_S", "3"))
# Pending sanction calls are retried this often (seconds) by the serve process's retry loop.
TRACECODE_RETRY_INTERVAL_S = float(env("TRACECODE_CONSOLE_RETRY_INTERVAL_S", "5"))
# Imports (intake.py): a file is checked whole before anything is written, in one request.
TRACECODE_IMPORT_MAX_BYTES = int(env("TRACECODE_CONSOLE_IMPORT_MAX_BYTES", str(20 * 1024 * 1024)))
TRACECODE_IMPORT_MAX_ROWS = int(env("TRACECODE_CONSOLE_IMPORT_MAX_ROWS", "1000"))  # a batch or complaints file
TRACECODE_IMPORT_MAX_ROWS_SITES = int(env("TRACECODE_CONSOLE_IMPORT_MAX_ROWS_SITES", "20000"))
TRACECODE_IMPORT_MAX_ROWS_ENGINE = int(env("TRACECODE_CONSOLE_IMPORT_MAX_ROWS_ENGINE", "20000"))  # leads, evidence
TRACECODE_IMPORT_MAX_TEXT = int(env("TRACECODE_CONSOLE_IMPORT_MAX_TEXT", "20000"))
# The deployment's pseudonym key (the server's and the leads engine's): one person, one pseudonym.
PSEUDONYM_KEY_FILE = env("TRACECODE_PSEUDONYM_KEY_FILE", str(DATA_DIR / "pseudonym.key"))
# The public code query (医保码上查, ledger/public.py): queries per client address per minute.
TRACECODE_PUBLIC_QUERY_PER_MINUTE = int(env("TRACECODE_CONSOLE_PUBLIC_QUERY_PER_MINUTE", "60"))
