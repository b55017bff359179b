"""The public code query (医保码上查, issue 28): anyone, without logging in, enters or scans one
code and sees the pack as issued (product, batch, expiry, status) and whether it was sold on
insurance: how many times (returns said apart), and the latest sale's date and region.

- Live: each query asks the service (GetCodeHistory over gRPC, the console's own identity), so
  a sale is visible the moment it settled, not two days later. The service parses the code (its
  codec, its scanner profile): a malformed code is answered with the codec's reason.
- Never a site, a settlement or a person: the answer is built here from the history, keeping
  only dates and the region of the latest sale (the site registry's region, Site.region); the
  service's answer itself never leaves the console.
- One code per query: one `code` parameter, one line, no wildcard characters (* ? %); a code
  that is no code is the codec's refusal, never a search.
- Rate limit per client address (REMOTE_ADDR: behind a proxy, that is the proxy; put the
  console's public path behind one that limits per real address, or none): at most
  TRACECODE_PUBLIC_QUERY_PER_MINUTE (60) queries in a one-minute window, counted in the
  ledger's database (PublicQueryWindow) so every console process counts the same; the next is
  HTTP 429 with a Chinese message and Retry-After. Every query, refused ones included, is
  counted by outcome (PublicQueryCount; tracecode_console_public_queries_total).

May import: Django, grpc, the generated stubs and the ledger app.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone as dt_timezone

import grpc
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.http import JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from tracecode.v1 import verification_pb2 as pb

from .models import PublicQueryCount, PublicQueryWindow, Site

WINDOW = timedelta(seconds=60)
MAX_CODE_LENGTH = 512
WILDCARDS = frozenset("*?%")
OUTCOMES = ("found", "not_issued", "malformed", "refused", "limited", "unavailable")
STATUS_TEXT = {"ACTIVE": "正常", "RECALLED": "已召回", "LOCKED": "已锁定", "STOLEN": "已挂失（被盗）",
               "DESTROYED": "已销毁"}


@dataclass
class Answer:
    outcome: str
    status: int = 200
    message: str = ""
    code: str = ""
    product_id: str = ""
    gtin: str = ""
    batch: str = ""
    expiry: str = ""
    manufacturer: str = ""
    pack_status: str = ""
    sold: bool = False
    sales: int = 0
    returned: int = 0
    latest_sale_date: str = ""
    latest_sale_region: str = ""
    retry_after_s: int = 0
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        body: dict = {"outcome": self.outcome}
        if self.message:
            body["message"] = self.message
        if self.outcome == "found":
            body.update({
                "code": self.code,
                "issued": {"product_id": self.product_id, "gtin": self.gtin, "batch": self.batch,
                           "expiry": self.expiry, "manufacturer": self.manufacturer,
                           "status": self.pack_status, "status_label": STATUS_TEXT.get(self.pack_status, self.pack_status)},
                "insured_sales": {"sold": self.sold, "times": self.sales, "returned": self.returned,
                                  "latest": {"date": self.latest_sale_date, "region": self.latest_sale_region}
                                  if self.sold else None},
                "summary": summary(self)})
        return body


def summary(a: Answer) -> str:
    if not a.sold:
        return "未在医保结算中售出"
    text = f"已售出 {a.sales} 次"
    if a.returned:
        text += f"（其中 {a.returned} 次已退货）"
    return text


def client_address(request) -> str:
    return (request.META.get("REMOTE_ADDR") or "unknown")[:64]


def count(outcome: str) -> None:
    """One more query with this outcome (atomic increment; the row made on first use)."""
    if PublicQueryCount.objects.filter(outcome=outcome).update(count=F("count") + 1):
        return
    try:
        with transaction.atomic():
            PublicQueryCount.objects.create(outcome=outcome, count=1)
    except IntegrityError:  # made meanwhile by another request
        PublicQueryCount.objects.filter(outcome=outcome).update(count=F("count") + 1)


def take(address: str, now: datetime | None = None) -> float:
    """Count one query of `address` in its window: 0 when allowed, else seconds until the window
    ends (nothing counted). A fixed one-minute window from the address's first query in it."""
    limit = settings.TRACECODE_PUBLIC_QUERY_PER_MINUTE
    now = now or timezone.now()
    for _ in range(2):
        with transaction.atomic():
            row = PublicQueryWindow.objects.select_for_update().filter(address=address).first()
            if row is None:
                try:
                    with transaction.atomic():
                        PublicQueryWindow.objects.create(address=address, window_start=now, count=1)
                except IntegrityError:
                    continue  # another request of the same address made it: count on that one
                # Windows long past keep nothing worth keeping: swept when a new address comes.
                PublicQueryWindow.objects.filter(window_start__lt=now - timedelta(hours=1)).delete()
                return 0.0
            if now - row.window_start >= WINDOW:
                row.window_start, row.count = now, 1
            elif row.count >= limit:
                return max((row.window_start + WINDOW - now).total_seconds(), 0.001)
            else:
                row.count += 1
            row.save(update_fields=["window_start", "count"])
            return 0.0
    return 0.0


def _refusal(raw: list[str]) -> str:
    """Why this is not one code (one parameter, one line, no wildcards), or ''."""
    if len(raw) > 1:
        return "每次只能查询一个追溯码"
    code = raw[0]
    if len(code) > MAX_CODE_LENGTH:
        return f"追溯码过长（{len(code)} 个字符，最多 {MAX_CODE_LENGTH}）"
    if "\n" in code or "\r" in code or "," in code or "，" in code:
        return "每次只能查询一个追溯码"
    if WILDCARDS & set(code):
        return "不支持通配符（* ? %），请输入完整的追溯码"
    return ""


def _date(ts) -> datetime | None:
    return ts.ToDatetime(tzinfo=dt_timezone.utc) if (ts.seconds or ts.nanos) else None


def from_history(resp: pb.GetCodeHistoryResponse) -> Answer:
    """The public answer from a code's history: dates and a region, nothing else of a sale."""
    rec = resp.record
    a = Answer("found", code=resp.canonical_code, product_id=rec.product_id, gtin=rec.gtin, batch=rec.batch,
               expiry=rec.expiry, manufacturer=rec.manufacturer, pack_status=pb.CodeStatus.Name(rec.status))
    # A sale is a settlement that took units of the pack (a split pack's parts are several);
    # a return gives a settlement's units back. Both by (site, settlement), kept here only.
    sales: dict[tuple[str, str], datetime | None] = {}
    returned: set[tuple[str, str]] = set()
    for e in resp.events:
        key = (e.site_id, e.settlement_id)
        if e.type == pb.DISPENSED:
            at, known = _date(e.at), sales.get(key)
            if key not in sales or (at is not None and (known is None or at > known)):
                sales[key] = at
        elif e.type == pb.REVERSED:
            returned.add(key)
    a.sales, a.returned, a.sold = len(sales), len(returned & sales.keys()), bool(sales)
    if sales:
        (site, _), at = max(sales.items(), key=lambda kv: kv[1] or datetime.min.replace(tzinfo=dt_timezone.utc))
        a.latest_sale_date = timezone.localtime(at).date().isoformat() if at else ""
        region = Site.objects.filter(site_id=site).values_list("region", flat=True).first()
        a.latest_sale_region = region or "未登记地区"
    if resp.events_total > len(resp.events):
        a.notes.append("该药盒记录较多，仅统计最近的记录")
    return a


def lookup(raw: str) -> Answer:
    from . import packs
    try:
        resp = packs.client().history(raw)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return Answer("malformed", 400, f"追溯码格式不正确：{exc.details()}")
        return Answer("unavailable", 503, "查询服务暂不可用，请稍后再试")
    if not resp.HasField("record"):
        return Answer("not_issued", 404, "未查到该追溯码的赋码信息：可能不是药品追溯码，或尚未赋码上传，请核对后再查")
    return from_history(resp)


def query(request) -> Answer | None:
    """The answer to the request's `code` (None: no code asked, just the page)."""
    raw = [c.strip() for c in request.GET.getlist("code")]
    if not raw or raw == [""]:
        return None
    wait = take(client_address(request))
    if wait:
        count("limited")
        return Answer("limited", 429, f"查询过于频繁：每个网络地址每分钟最多查询 "
                                      f"{settings.TRACECODE_PUBLIC_QUERY_PER_MINUTE} 次，请 {math.ceil(wait)} 秒后再试",
                      retry_after_s=math.ceil(wait))
    why = _refusal(raw)
    answer = Answer("refused", 400, why) if why else lookup(raw[0])
    count(answer.outcome)
    return answer


def _respond(resp, answer: Answer | None):
    if answer is not None and answer.retry_after_s:
        resp["Retry-After"] = str(answer.retry_after_s)
    resp["Cache-Control"] = "no-store"
    return resp


@require_GET
def page(request):
    answer = query(request)
    resp = render(request, "ledger/public.html", {"answer": answer, "code": request.GET.get("code", ""),
                                                  "summary": summary(answer) if answer and answer.outcome == "found" else ""},
                  status=answer.status if answer else 200)
    return _respond(resp, answer)


@require_GET
def api(request):
    answer = query(request)
    if answer is None:
        answer = Answer("refused", 400, "请提供一个追溯码：?code=<追溯码>")
    return _respond(JsonResponse(answer.as_json(), status=answer.status, json_dumps_params={"ensure_ascii": False}),
                    answer)


class Collector:
    """tracecode_console_public_queries_total{outcome} from the ledger at each scrape."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily
        c = CounterMetricFamily("tracecode_console_public_queries", "Public code queries (医保码上查) by outcome",
                                labels=["outcome"])
        have = dict(PublicQueryCount.objects.values_list("outcome", "count"))
        for outcome in OUTCOMES:
            c.add_metric([outcome], have.get(outcome, 0))
        yield c
