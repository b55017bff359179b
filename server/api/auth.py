"""Who is calling, and what they may do: client identities from mutual-TLS certificates or signed
bearer tokens, the per-method access policy, per-client rate limits, the gRPC transport
credentials, and the Redis connection's credentials. docs/security.md is the operator's guide.

Identities are `site:<site id>` (a pharmacy's POS) or `admin:<name>` (a regulator's operator):

- mtls: the client certificate, verified against `tls_client_ca` during the TLS handshake, names
  the identity in a URI subject alternative name `urn:tracecode:site:<id>` and/or in its common
  name `site:<id>`. A certificate naming two different identities is refused.
- token: `authorization: Bearer <JWT>` metadata, HS256 with the secret in
  `auth_token_secret_file`, claims sub (the id), role (site | admin), aud "tracecode", exp.
- none: no identities; the request body's site id is trusted. Local development and the demo only.

The AuthInterceptor authenticates every call before its handler runs (UNAUTHENTICATED when the
credentials are missing or invalid), applies the policy table (PERMISSION_DENIED when the role may
not call the method; methods of unknown services are denied), applies the rate limit
(RESOURCE_EXHAUSTED), and leaves the caller in a context variable for the servicers' `identity` and
`authorize` hooks, which turn it into the site used for marking and the actor of admin changes.
"""
from __future__ import annotations

import contextvars
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..config import Config
from ..errors import PermissionDenied
from .interceptors import WrapCache, rewrap

log = logging.getLogger("tracecode.auth")

SITE, ADMIN = "site", "admin"
ROLES = (SITE, ADMIN)
MODES = ("none", "mtls", "token")
URI_PREFIX = "urn:tracecode:"
TOKEN_AUDIENCE = "tracecode"
# Same alphabet as site ids (verifier._ID): identities end up in keys, logs and audit events.
_NAME = re.compile(r"[A-Za-z0-9._\-]{1,64}\Z")
_MIN_SECRET_BYTES = 32  # HS256 keys shorter than the hash (256 bits) weaken it (RFC 7518 3.2)
_CLOCK_LEEWAY_S = 30  # token exp/nbf tolerance for clock differences between issuer and server

INSECURE_WARNING = ("INSECURE: auth = none: clients are not authenticated, so any client can act as "
                    "any pharmacy (mark and reverse in its name) and load or recall issuance data. "
                    "For local development and the demo only; use --auth mtls or --auth token.")


@dataclass(frozen=True, slots=True)
class Identity:
    role: str  # SITE or ADMIN
    name: str  # the site id, or the operator's name

    def __str__(self) -> str:
        return f"{self.role}:{self.name}"


def parse_identity(text: str) -> Identity | None:
    """`site:<id>` / `admin:<name>` (optionally behind `urn:tracecode:`), else None."""
    if text.startswith(URI_PREFIX):
        text = text[len(URI_PREFIX):]
    role, sep, name = text.partition(":")
    if sep and role in ROLES and _NAME.match(name):
        return Identity(role, name)
    return None


class AuthError(Exception):
    """The call cannot proceed: `code` is UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _unauthenticated(message: str) -> AuthError:
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, message)


# --------------------------------------------------------------------------- authentication

class Authenticator:
    """Turns a call's transport and metadata into an Identity, or raises AuthError."""

    def __init__(self, mode: str, *, token_secret: bytes = b"", admin_names: frozenset[str] = frozenset()):
        if mode not in ("mtls", "token"):
            raise ValueError(f"auth: {mode!r} is not an authenticating mode")
        self.mode = mode
        self.token_secret = token_secret
        # Empty: any admin identity the CA (or the token secret) vouches for is an admin.
        self.admin_names = admin_names
        if mode == "token":
            import jwt  # PyJWT; imported here so mtls and none deployments do not need it
            self._jwt = jwt

    def authenticate(self, context: grpc.ServicerContext) -> Identity:
        who = self._from_certificate(context) if self.mode == "mtls" else self._from_token(context)
        if who.role == ADMIN and self.admin_names and who.name not in self.admin_names:
            # Authentic, but not on the operators' list: may not act as an admin.
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            f"{who} is not in admin_identities")
        return who

    @staticmethod
    def _from_certificate(context: grpc.ServicerContext) -> Identity:
        auth = context.auth_context()
        if auth.get("transport_security_type") != [b"ssl"] or "x509_pem_cert" not in auth:
            # Only reachable when TLS is misconfigured: mtls servers require a verified certificate.
            raise _unauthenticated("a client certificate is required")
        # Every tracecode identity the certificate names, in SAN URIs and the CN alike: they must
        # agree, so a certificate cannot carry one identity for one reader and another for another.
        found = {parse_identity(u.decode(errors="replace")) for u in auth.get("peer_uri", ())
                 if u.startswith(URI_PREFIX.encode())}
        found |= {parse_identity(cn.decode(errors="replace")) for cn in auth.get("x509_common_name", ())}
        found.discard(None)
        if len(found) != 1:
            subject = b",".join(auth.get("x509_subject", [b"?"])).decode(errors="replace")
            what = "names no" if not found else "names more than one"
            raise _unauthenticated(f"client certificate {subject!r} {what} tracecode identity "
                                   f"(SAN URI {URI_PREFIX}site:<id> or CN site:<id> / admin:<name>)")
        who = found.pop()
        assert who is not None
        return who

    def _from_token(self, context: grpc.ServicerContext) -> Identity:
        values = [v for k, v in context.invocation_metadata() if k == "authorization"]
        if not values:
            raise _unauthenticated("missing authorization metadata: 'Bearer <token>'")
        if len(values) > 1:
            raise _unauthenticated("more than one authorization value")
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthenticated("authorization must be 'Bearer <token>'")
        jwt = self._jwt
        try:
            # The algorithm list is fixed: a token cannot choose "none" or an asymmetric scheme.
            claims = jwt.decode(token.strip(), self.token_secret, algorithms=["HS256"],
                                audience=TOKEN_AUDIENCE, leeway=_CLOCK_LEEWAY_S,
                                options={"require": ["exp", "sub", "role", "aud"]})
        except jwt.ExpiredSignatureError:
            raise _unauthenticated("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise _unauthenticated(f"invalid token: {exc}") from None
        role, name = claims.get("role"), claims.get("sub")
        if role not in ROLES or not isinstance(name, str) or not _NAME.match(name):
            raise _unauthenticated("token claims must be role site|admin and sub 1-64 of A-Z a-z 0-9 . _ -")
        return Identity(role, name)


def issue_token(secret: bytes, role: str, name: str, ttl_s: float, now: float | None = None) -> str:
    """A bearer token for `tracecode token` and the tests (HS256, aud tracecode)."""
    import jwt
    if role not in ROLES or not _NAME.match(name):
        raise ValueError("role must be site or admin, name 1-64 of A-Z a-z 0-9 . _ -")
    now = time.time() if now is None else now
    return jwt.encode({"sub": name, "role": role, "aud": TOKEN_AUDIENCE, "iat": int(now),
                       "exp": int(now + ttl_s)}, secret, algorithm="HS256")


def read_secret(path: str) -> bytes:
    with open(path, "rb") as fh:
        secret = fh.read().strip()
    if len(secret) < _MIN_SECRET_BYTES:
        raise ValueError(f"auth_token_secret_file {path}: {len(secret)} bytes, at least "
                         f"{_MIN_SECRET_BYTES} (e.g. `head -c 32 /dev/urandom | base64 > FILE`)")
    return secret


# --------------------------------------------------------------------------- policy

PUBLIC = frozenset({"*"})  # no credentials needed (load-balancer health probes)
_ANY = frozenset(ROLES)

# Service -> roles allowed, with per-method overrides. A service absent from the table is denied,
# so a service added later is closed until someone decides who may call it.
SERVICE_ROLES: dict[str, frozenset] = {
    "tracecode.v1.Verification": frozenset({SITE}),
    "tracecode.v1.Admin": frozenset({ADMIN}),
    "tracecode.v1.BulkVerification": frozenset({ADMIN}),
    # The audit feed (server/api/audit.py, issue 24): the ledger console's LIVE leads.
    "tracecode.v1.AuditFeed": frozenset({ADMIN}),
    # Who the caller is (server/api/identity.py, issue 28): any authenticated identity.
    "tracecode.v1.Identity": _ANY,
    # The receiving check (server/api/receiving.py, issue 28): a pharmacy's own deliveries.
    "tracecode.v1.Receiving": frozenset({SITE}),
    "grpc.health.v1.Health": PUBLIC,
    "grpc.reflection.v1alpha.ServerReflection": _ANY,
    "grpc.reflection.v1.ServerReflection": _ANY,
}
METHOD_ROLES: dict[str, frozenset] = {
    # Read-only: the regulator's operators audit codes too. They mark and reverse nothing.
    "/tracecode.v1.Verification/CheckCodes": _ANY,
    "/tracecode.v1.Verification/GetCodeHistory": _ANY,
}


def roles_for(method: str) -> frozenset:
    if method in METHOD_ROLES:
        return METHOD_ROLES[method]
    service = method.lstrip("/").rpartition("/")[0]
    return SERVICE_ROLES.get(service, frozenset())


# --------------------------------------------------------------------------- rate limits

class RateLimiter:
    """A token bucket per client key: `rate` calls per second on average, bursts of `burst`.

    Unary calls that find the bucket empty are refused (RESOURCE_EXHAUSTED, with RetryInfo: the POS
    client retries it). Messages of a client stream (issuance uploads, bulk chunks) wait for a token
    instead: the handler then reads the stream slower and gRPC flow control slows the client down.
    Per process: with `workers` > 1 each process has its own buckets."""

    _MAX_KEYS = 100_000  # idle buckets are dropped past this many clients

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = float(rate), float(max(burst, 1)), clock
        self._buckets: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _take(self, key: str) -> float:
        """Take one token; 0.0 when granted, else the seconds until one is due (nothing taken)."""
        now = self.clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                if len(self._buckets) >= self._MAX_KEYS:
                    self._evict(now)
                b = self._buckets[key] = [self.burst, now]
            tokens = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
            if tokens >= 1.0:
                b[0] = tokens - 1.0
                return 0.0
            b[0] = tokens
            return (1.0 - tokens) / self.rate

    def _evict(self, now: float) -> None:
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]

    def try_take(self, key: str) -> float:
        return self._take(key)

    def take_waiting(self, key: str, context: grpc.ServicerContext) -> None:
        while (wait := self._take(key)) > 0:
            if not context.is_active():
                return
            time.sleep(min(wait, 1.0))


# --------------------------------------------------------------------------- interceptor

# The authenticated caller of the call this thread is handling (set by AuthInterceptor).
_CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("tracecode_caller", default=None)


def current_caller() -> Identity | None:
    """The caller of the call this thread is handling, as the AuthInterceptor admitted it (None
    without authentication)."""
    return _CALLER.get()


def _abort(context: grpc.ServicerContext, err: AuthError):
    context.abort(err.code, str(err))


def _abort_rate(context: grpc.ServicerContext, who: str, wait_s: float, limiter: RateLimiter):
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
        seconds=int(wait_s), nanos=int((wait_s % 1) * 1e9)))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED,
                               message=f"rate limit: {limiter.rate:g} calls/s per client ({who}); "
                                       f"retry in {wait_s:.2f} s")
    status.details.add().Pack(retry)
    context.abort_with_status(rpc_status.to_status(status))


def _peer_host(context: grpc.ServicerContext) -> str:
    peer = context.peer() or "?"  # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:..."
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class AuthInterceptor(grpc.ServerInterceptor):
    """Authentication, policy and rate limit of every call, before its handler runs.

    With authenticator None (auth = none) only the rate limit applies, per peer address."""

    wraps_by_method = True  # what it wraps depends on the method only (interceptors.Chain)

    def __init__(self, authenticator: Authenticator | None, limiter: RateLimiter | None = None):
        self.authenticator = authenticator
        self.limiter = limiter
        self._wrapped = WrapCache()

    def _admit(self, method: str, roles: frozenset, context) -> Identity | None:
        who = None
        if self.authenticator is not None:
            try:
                who = self.authenticator.authenticate(context)
            except AuthError as err:
                _abort(context, err)
                raise  # _abort raised already; for the type checker
            if who.role not in roles:
                _abort(context, AuthError(grpc.StatusCode.PERMISSION_DENIED,
                                          f"{who} may not call {method}"))
        if self.limiter is not None:
            wait = self.limiter.try_take(str(who) if who else _peer_host(context))
            if wait > 0:
                _abort_rate(context, str(who) if who else _peer_host(context), wait, self.limiter)
        return who

    def _throttled(self, requests: Iterator, key: str, context) -> Iterator:
        for i, msg in enumerate(requests):
            if i and self.limiter:  # the first message was paid for when the call was admitted
                self.limiter.take_waiting(key, context)
            yield msg

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        roles = roles_for(method)
        if roles is PUBLIC:
            return handler
        return self._wrapped.get(method, handler, lambda: self._wrap(method, roles, handler))

    def _wrap(self, method: str, roles: frozenset, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        admit, limiter, throttled = self._admit, self.limiter, self._throttled

        def enter(request, context, streaming: bool):
            who = admit(method, roles, context)
            if streaming and limiter is not None:
                request = throttled(request, str(who) if who else _peer_host(context), context)
            return who, request

        def unary(behavior, streaming):
            def handle(request, context):
                who, request = enter(request, context, streaming)
                token = _CALLER.set(who)
                try:
                    return behavior(request, context)
                finally:
                    _CALLER.reset(token)
            return handle

        def generator(behavior, streaming):
            def handle(request, context):
                who, request = enter(request, context, streaming)
                token = _CALLER.set(who)
                try:
                    yield from behavior(request, context)
                finally:
                    try:
                        _CALLER.reset(token)
                    except ValueError:  # closed from another context (garbage collection)
                        pass
            return handle

        return rewrap(handler, unary, generator)


# --------------------------------------------------------------------------- servicer hooks

class Hooks:
    """The servicers' `identity` and `authorize` hooks over the interceptor's verdict. They also
    stand alone (no interceptor: they authenticate the call themselves), failing closed."""

    def __init__(self, authenticator: Authenticator):
        self.authenticator = authenticator

    def _caller(self, context) -> tuple[Identity, bool]:
        who = _CALLER.get()
        if who is not None:
            return who, True
        try:
            return self.authenticator.authenticate(context), False
        except AuthError as err:
            _abort(context, err)
            raise  # _abort raised already; for the type checker

    def identity(self, context) -> str | None:
        """The site id the call acts for: a site's own id. An admin reaches here only on the
        read-only methods the policy opens to admins, and then the body's site id is used."""
        who, checked = self._caller(context)
        if who.role == SITE:
            return who.name
        if checked:
            return None
        raise PermissionDenied(f"{who} has no site: dispenses and returns need a site identity")

    def authorize(self, context) -> str:
        """The actor of an admin call (kept in the audit stream), or PERMISSION_DENIED."""
        who, _ = self._caller(context)
        if who.role != ADMIN:
            raise PermissionDenied(f"{who} is not an admin identity: issuance, status, recall and "
                                   "bulk jobs need an admin:<name> certificate or token")
        return str(who)


# --------------------------------------------------------------------------- transport

def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


class _CertificateFiles:
    """Server certificate (and client CA) read from files, re-read when a file changes, so a
    certificate can be renewed without a restart: gRPC asks before every new connection's
    handshake; established connections keep theirs."""

    def __init__(self, cert: str, key: str, client_ca: str | None):
        self.paths = [p for p in (cert, key, client_ca) if p]
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamp = self._stat()
        self.initial = self._configuration()

    def _stat(self):
        return tuple((os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in self.paths)

    def _configuration(self):
        return grpc.ssl_server_certificate_configuration(
            [(_read(self.key), _read(self.cert))],
            root_certificates=_read(self.client_ca) if self.client_ca else None)

    def fetch(self):
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            config = self._configuration()
        except (OSError, ValueError, RuntimeError) as exc:
            # Mid-rotation (one file written, not the other) or unreadable: keep the current one.
            log.warning("tls: keeping the current certificate: %s", exc)
            return None
        self._stamp = stamp
        log.info("tls: certificate files changed, new connections use the new ones")
        return config


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    if not (config.tls_cert or config.tls_key):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("tls_cert and tls_key go together")
    files = _CertificateFiles(config.tls_cert, config.tls_key,
                              config.tls_client_ca if config.auth == "mtls" else None)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch,
                                               require_client_authentication=config.auth == "mtls")


# --------------------------------------------------------------------------- assembly

@dataclass
class Security:
    """What `serve` hands to Server: transport credentials, interceptors, servicer hooks."""
    mode: str
    credentials: grpc.ServerCredentials | None = None
    interceptors: list = field(default_factory=list)
    identity: Callable | None = None
    authorize: Callable | None = None
    warnings: list[str] = field(default_factory=list)

    def server_kwargs(self) -> dict:
        return {"credentials": self.credentials, "interceptors": self.interceptors,
                "identity": self.identity, "authorize": self.authorize}


def from_config(config: Config) -> Security:
    """Validate the security settings and build them; ValueError names what is wrong."""
    mode = config.auth
    if mode not in MODES:
        raise ValueError(f"auth: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "mtls" and not (config.tls_cert and config.tls_key and config.tls_client_ca):
        raise ValueError("auth = mtls needs tls_cert, tls_key and tls_client_ca")
    if mode == "token" and not config.auth_token_secret_file:
        raise ValueError("auth = token needs auth_token_secret_file")
    if mode != "mtls" and config.tls_client_ca:
        raise ValueError("tls_client_ca is only used with auth = mtls")
    admins = frozenset(n.strip() for n in config.admin_identities.split(",") if n.strip())
    for name in admins:
        if not _NAME.match(name):
            raise ValueError(f"admin_identities: {name!r} is not 1-64 of A-Z a-z 0-9 . _ -")
    sec = Security(mode, credentials=server_credentials(config))
    limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_burst) if config.rate_limit_rps > 0 else None
    if mode == "none":
        sec.warnings.append(INSECURE_WARNING)
        if limiter:
            sec.interceptors.append(AuthInterceptor(None, limiter))
        return sec
    authenticator = Authenticator(
        mode, token_secret=read_secret(config.auth_token_secret_file) if mode == "token" else b"",
        admin_names=admins)
    hooks = Hooks(authenticator)
    sec.interceptors.append(AuthInterceptor(authenticator, limiter))
    sec.identity, sec.authorize = hooks.identity, hooks.authorize
    if mode == "token" and sec.credentials is None:
        sec.warnings.append("INSECURE: auth = token without tls_cert/tls_key: bearer tokens cross the "
                            "network in clear text and can be replayed by anyone who sees them")
    return sec


# --------------------------------------------------------------------------- Redis

def redis_url(config: Config, url: str) -> str:
    """`url` with the Redis credentials and TLS files of the config added (redis-py reads them
    from the URL). The password comes from a file, so it is on no command line or environment."""
    if not (config.redis_username or config.redis_password_file or config.redis_tls_ca
            or config.redis_tls_cert or config.redis_tls_key):
        return url
    parts = urlsplit(url)
    if parts.scheme == "unix":
        if config.redis_tls_ca or config.redis_tls_cert or config.redis_tls_key:
            raise ValueError("redis_tls_* apply to rediss:// URLs, not unix sockets")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    user = config.redis_username or (parts.username or "")
    password = parts.password or ""
    if config.redis_password_file:
        with open(config.redis_password_file, encoding="utf-8") as fh:
            password = fh.read().strip()
    if user or password:
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{netloc}"
    query = parts.query
    tls = {k: v for k, v in (("ssl_ca_certs", config.redis_tls_ca), ("ssl_certfile", config.redis_tls_cert),
                            ("ssl_keyfile", config.redis_tls_key)) if v}
    scheme = parts.scheme
    if tls:
        if scheme == "redis":
            raise ValueError("redis_tls_* need a rediss:// URL (TLS), got redis://")
        query = "&".join(q for q in (query, urlencode(tls)) if q)
    return urlunsplit((scheme, netloc, parts.path, query, parts.fragment))
