"""The pharmacy API (issue 28): a site lists the alerts its own counter raised and answers them,
as JSON over the console's web server, authenticated by the site's own tracecode token.

Why here and not a gRPC service on the server: the alerts, the answers and the leads they are
evidence of are the ledger's (its database); the server keeps no alert state. Why the site's
token and not a console login: the pharmacy already holds one (`tracecode token site <id>`), and a
second set of credentials per pharmacy would be one more thing to issue and revoke.

The token is verified by the server, not here: the console passes it to `Identity.WhoAmI`
(server/api/identity.py) as the call's own authorization, so the server's authenticator checks
signature, audience, expiry and role exactly as for a settlement, and the console never holds the
secret that signs tokens (holding it, it could mint any identity). A good answer is remembered for
TOKEN_CACHE_S seconds (keyed by the token's SHA-256), so a token revoked or expired is still
taken for at most that long.

Isolation: the site is the token's, never a parameter; every query goes through
alerts.for_site(site). Another site's alert is answered 404 like one that does not exist.

May import: Django, grpc, tracecode.clients, the generated stubs and the ledger app.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time

import grpc
from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from . import alerts
from .rules import ANSWER_CAUSES

TOKEN_CACHE_S = 30.0
_CACHE_MAX = 10_000
_cache: dict[str, tuple[str, float]] = {}
_lock = threading.Lock()
_client = None


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _identity_client():
    global _client
    with _lock:
        if _client is None:
            from tracecode.clients.identity import IdentityClient

            from .gateway import service_credentials
            _client = IdentityClient(settings.TRACECODE_SERVER, credentials=service_credentials(),
                                     timeout_s=settings.TRACECODE_RPC_TIMEOUT_S)
        return _client


def reset_client() -> None:
    global _client
    with _lock:
        if _client is not None:
            _client.close()
        _client = None
        _cache.clear()


def site_of(request) -> str:
    """The site id of the request's bearer token, as the server verifies it; Refused otherwise."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Refused(401, "缺少药店令牌：请在请求头中提供 Authorization: Bearer <令牌>（tracecode token site <机构编码>）")
    digest = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
    now = time.monotonic()
    with _lock:
        hit = _cache.get(digest)
    if hit and hit[1] > now:
        return hit[0]
    try:
        who = _identity_client().whoami(metadata=(("authorization", f"Bearer {token}"),))
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise Refused(401, f"令牌无效或已过期（{exc.details()}）") from None
        if code == grpc.StatusCode.PERMISSION_DENIED:
            raise Refused(403, f"该令牌无权访问（{exc.details()}）") from None
        raise Refused(503, f"结算服务暂不可用，请稍后再试（{code.name}）") from None
    if not who.authenticated:
        raise Refused(503, "结算服务未启用身份认证（auth = none），药店接口不可用")
    if who.role != "site":
        raise Refused(403, f"该令牌不是药店身份（{who.role}:{who.name}）")
    with _lock:
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[digest] = (who.name, now + TOKEN_CACHE_S)
    return who.name


def _error(status: int, message: str, field: str = "") -> JsonResponse:
    body = {"error": message}
    if field:
        body["field"] = field
    return JsonResponse(body, status=status, json_dumps_params={"ensure_ascii": False})


def _api(view):
    def wrapped(request, *args, **kwargs):
        try:
            site = site_of(request)
        except Refused as exc:
            resp = _error(exc.status, str(exc))
            if exc.status == 401:
                resp["WWW-Authenticate"] = 'Bearer realm="tracecode-pharmacy"'
            return resp
        return view(request, site, *args, **kwargs)
    wrapped.__name__ = view.__name__
    return csrf_exempt(wrapped)  # no cookies: the token is the credential, not a session


CAUSES_JSON = [{"code": k, "label": v.label} for k, v in ANSWER_CAUSES.items()]


@require_GET
@_api
def alert_list(request, site):
    which = request.GET.get("state", "all")
    if which not in ("all", "open", "answered"):
        return _error(400, "state 须为 all、open 或 answered", "state")
    found = alerts.list_alerts(site, which)
    return JsonResponse({"site_id": site, "alerts": [alerts.as_json(a) for a in found], "causes": CAUSES_JSON},
                        json_dumps_params={"ensure_ascii": False})


@require_POST
@_api
def alert_answer(request, site, alert_id):
    if request.content_type == "application/json":
        try:
            body = json.loads(request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            return _error(400, "请求体不是有效的 JSON")
        if not isinstance(body, dict):
            return _error(400, "请求体须为 JSON 对象：{\"cause\": ..., \"note\": ...}")
    else:
        body = request.POST
    cause, note = body.get("cause", ""), body.get("note", "")
    if not isinstance(cause, str) or not isinstance(note, str):
        return _error(400, "cause 与 note 须为字符串")
    try:
        a = alerts.answer(site, alert_id, cause, note)
    except alerts.NotFound:
        return _error(404, "没有该预警（或不属于本机构）")
    except alerts.Invalid as exc:
        return _error(400, str(exc), exc.field)
    except alerts.Conflict as exc:
        return _error(409, str(exc))
    return JsonResponse({"alert": alerts.as_json(a)}, json_dumps_params={"ensure_ascii": False})
