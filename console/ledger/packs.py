"""Each pack's live history from tracecode (GetCodeHistory over gRPC) and the resale chain a
lead's packs draw (site -> site where a pack first sold at one was sold again at the other)."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape

import grpc
from django.conf import settings

from tracecode.v1 import verification_pb2 as pb

_lock = threading.Lock()
_pos = None


def _client():
    global _pos
    with _lock:
        if _pos is None:
            from tracecode.clients.pos import PosClient
            from .gateway import service_metadata
            metadata = service_metadata()
            _pos = PosClient(settings.TRACECODE_SERVER, deadline_s=min(settings.TRACECODE_RPC_TIMEOUT_S, 2.0),
                             retries=0, metadata=metadata)
        return _pos


def client():
    """The console's PosClient (its own identity): GetCodeHistory for lead pages and the public query."""
    return _client()


@dataclass(frozen=True)
class PackEvent:
    type: str
    at: datetime | None
    site_id: str
    settlement_id: str
    units: int
    detail: str


@dataclass
class PackHistory:
    code: str
    ok: bool
    error: str = ""
    product_id: str = ""
    status: str = ""
    first_site_id: str = ""
    units_used: int = 0
    events: list[PackEvent] = field(default_factory=list)
    events_total: int = 0


def _when(ts) -> datetime | None:
    return ts.ToDatetime(tzinfo=timezone.utc) if ts.seconds or ts.nanos else None


def history(code: str) -> PackHistory:
    try:
        resp = _client().history(code)
    except grpc.RpcError as exc:
        return PackHistory(code, False, f"{exc.code().name}: {exc.details()}")
    rec = resp.record if resp.HasField("record") else None
    return PackHistory(
        code=resp.canonical_code or code, ok=True, product_id=rec.product_id if rec else "",
        status=pb.CodeStatus.Name(rec.status) if rec else "未赋码",
        first_site_id=resp.first_dispense.first_site_id if resp.HasField("first_dispense") else "",
        units_used=resp.units_used,
        events=[PackEvent(pb.EventType.Name(e.type), _when(e.at), e.site_id, e.settlement_id, e.units, e.detail)
                for e in resp.events], events_total=resp.events_total)


# After one of these, the service is taken as away for the rest of the page: a lead with many
# packs must not wait one deadline per pack.
_AWAY = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "PERMISSION_DENIED")


def histories(codes: list[str]) -> list[PackHistory]:
    out: list[PackHistory] = []
    for c in codes:
        if out and not out[-1].ok and out[-1].error.startswith(_AWAY):
            out.append(PackHistory(c, False, out[-1].error))
            continue
        out.append(history(c))
    return out


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    packs: int


def chain(evidence, histories: list[PackHistory]) -> list[Edge]:
    """First seller -> later seller, per pack: from the evidence roles (first/later) and from the
    live histories (the first dispense's site -> each site with a DUPLICATE attempt)."""
    pairs: dict[tuple[str, str], set[str]] = {}
    by_code: dict[str, dict[str, set[str]]] = {}
    for e in evidence:
        by_code.setdefault(e.canonical_code, {"first": set(), "later": set()}).setdefault(e.role, set()).add(e.site_id)
        if e.first_site_id and e.first_site_id != e.site_id:
            pairs.setdefault((e.first_site_id, e.site_id), set()).add(e.canonical_code)
    for code, roles in by_code.items():
        for a in roles.get("first", ()):
            for b in roles.get("later", ()):
                if a != b:
                    pairs.setdefault((a, b), set()).add(code)
    for h in histories:
        if not h.ok or not h.first_site_id:
            continue
        for ev in h.events:
            if ev.type == "DUPLICATE_ATTEMPT" and ev.detail in ("DUPLICATE", "") and ev.site_id and ev.site_id != h.first_site_id:
                pairs.setdefault((h.first_site_id, ev.site_id), set()).add(h.code)
    return sorted((Edge(a, b, len(c)) for (a, b), c in pairs.items()), key=lambda e: (-e.packs, e.src, e.dst))


def chain_svg(edges: list[Edge], highlight: set[str]) -> str:
    """The resale chain as an inline SVG: sites on a circle, an arrow per edge labelled with packs."""
    nodes = sorted({e.src for e in edges} | {e.dst for e in edges})
    if not nodes:
        return ""
    w, h, r = 640, 360, 130
    cx, cy = w / 2, h / 2
    pos = {n: (cx + r * math.cos(2 * math.pi * i / len(nodes) - math.pi / 2),
               cy + r * math.sin(2 * math.pi * i / len(nodes) - math.pi / 2)) for i, n in enumerate(nodes)}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chain" viewBox="0 0 {w} {h}" role="img" '
           f'aria-label="转售链条">',
           '<defs><marker id="arr" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" fill="#b33"/></marker></defs>']
    for e in edges:
        (x1, y1), (x2, y2) = pos[e.src], pos[e.dst]
        dx, dy = x2 - x1, y2 - y1
        d = math.hypot(dx, dy) or 1
        sx, sy, ex, ey = x1 + dx / d * 28, y1 + dy / d * 28, x2 - dx / d * 28, y2 - dy / d * 28
        out.append(f'<line x1="{sx:.1f}" y1="{sy:.1f}" x2="{ex:.1f}" y2="{ey:.1f}" stroke="#b33" '
                   f'stroke-width="{1 + min(e.packs, 6)}" marker-end="url(#arr)"/>')
        out.append(f'<text x="{(sx + ex) / 2:.1f}" y="{(sy + ey) / 2 - 4:.1f}" class="edge">{e.packs} 盒</text>')
    for n in nodes:
        x, y = pos[n]
        fill = "#fde2e2" if n in highlight else "#e8f0fe"
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="26" fill="{fill}" stroke="#345"/>'
                   f'<text x="{x:.1f}" y="{y + 44:.1f}" text-anchor="middle" class="node">{escape(n)}</text>')
    out.append("</svg>")
    return "".join(out)


def reset_client() -> None:
    global _pos
    with _lock:
        if _pos is not None:
            _pos.close()
        _pos = None
