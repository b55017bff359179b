"""Sanctions at the point of sale (shared/spec/ledger.md, "Sanctions at settlement"): the rules.

A sanction is a typed entry (`Sanction`): a kind, a subject (a site, or an insured person's
pseudonym), a validity, who imposed it and why, and, once lifted, who lifted it. This module
holds what the kinds mean (`KINDS`, a table), how a SetSanction request is validated, when an
entry binds (`Sanction.binds_now`, live settlements; `Sanction.in_force_at`, historical ones),
the notice a refusal carries (`Notice`), and `SanctionView`: a process's copy of every entry,
fed by the store's change stream, with its age (the freshness bound of docs/scaling.md).

The same rule is written once more in Lua (server/store/lua/gate.lua), where a single Redis node
judges it in the settlement's own atomic call; tests run both backends over one suite.

May import: the standard library and errors. No gRPC (api/sanctions.py), no Redis
(store/sanctions.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Callable, Iterable, Sequence
from zoneinfo import ZoneInfo

from tracecode.rules import insured
from tracecode.rules.rows import ID_RE
from tracecode.rules.settlement import MAX_TIME_MS  # 2100-01-01, as a settlement's
from tracecode.rules.text import problems as text_problems
from tracecode.rules.pseudonym import Pseudonymizer

from .errors import InvalidRequest

log = logging.getLogger("tracecode.sanctions")

SITE, INSURED = "SITE", "INSURED"
SITE_SANCTIONED, INSURED_SANCTIONED = "SITE_SANCTIONED", "INSURED_SANCTIONED"

# Limits of the fields of a SetSanction / LiftSanction request (characters).
MAX_REQUEST_ID = 128
MAX_REASON = 500
MAX_REFERENCE = 128
MAX_ACTOR = 128
_SITE_ID = ID_RE  # site ids end up in keys: the rules core's alphabet (rules/rows.py), as the verifier's
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,%d}\Z" % MAX_REQUEST_ID)
_SANCTION_ID = re.compile(r"sx-[0-9a-f]{20}\Z")


@dataclass(frozen=True, slots=True)
class KindRule:
    subject: str  # SITE or INSURED
    may_end: bool  # whether valid_until is allowed (else: until lifted)
    refusal: str  # the ErrorInfo reason of a refused settlement
    label: str  # the regulator's name of the action
    says: str  # how a pharmacist's message names it


# What each kind means (admin.proto SanctionKind): data, read by validation, enforcement and text.
KINDS: dict[str, KindRule] = {
    "SUSPEND_SERVICE": KindRule(SITE, True, SITE_SANCTIONED, "暂停医保服务",
                                "the site's insured service is suspended"),
    "TERMINATE_AGREEMENT": KindRule(SITE, False, SITE_SANCTIONED, "解除定点协议",
                                    "the site's designated-service agreement is terminated"),
    "BLACKLIST": KindRule(SITE, False, SITE_SANCTIONED, "列入医保黑名单",
                          "the site is on the medical-insurance blacklist"),
    "SUSPEND_CARD": KindRule(INSURED, True, INSURED_SANCTIONED, "暂停医保卡结算",
                             "the insured person's card settlement is suspended"),
}
# Site sanctions are named before person sanctions in a refusal (the site's is the broader one).
_SUBJECT_ORDER = {SITE: 0, INSURED: 1}


@dataclass(frozen=True, slots=True)
class Sanction:
    """One sanction entry as stored (JSON with short keys, `to_json` / `from_json`). Times are ms
    since the epoch; 0 means unset (no end / not lifted)."""
    sanction_id: str
    kind: str
    subject: str
    subject_id: str  # the site id, or the insured pseudonym; never a raw insured id
    valid_from_ms: int
    valid_until_ms: int
    reason: str
    reference: str
    actor: str
    created_at_ms: int
    request_id: str = ""
    digest: str = ""
    lifted_at_ms: int = 0
    lifted_by: str = ""
    lift_reason: str = ""

    @property
    def since_ms(self) -> int:
        """When it starts binding: a sanction never acts before it was imposed."""
        return max(self.valid_from_ms, self.created_at_ms)

    @property
    def end_ms(self) -> int:
        """When it stops binding (its end or its lift, the earlier), 0 = not yet known."""
        ends = [t for t in (self.valid_until_ms, self.lifted_at_ms) if t]
        return min(ends) if ends else 0

    def binds_now(self, now_ms: int) -> bool:
        """Whether a live settlement judged at `now_ms` is refused. A sanction that starts at
        once (valid_from not after its creation) binds from the instant it is stored, whatever
        the clocks of the servers that read it; one that starts later binds from valid_from.
        (The same rule is in lua/gate.lua.)"""
        if self.lifted_at_ms:
            return False
        started = self.valid_from_ms <= self.created_at_ms or self.valid_from_ms <= now_ms
        return started and (not self.valid_until_ms or now_ms < self.valid_until_ms)

    def in_force_at(self, at_ms: int) -> bool:
        """Whether a settlement made at `at_ms` (a historical one, bulk jobs) fell under it."""
        end = self.end_ms
        return self.since_ms <= at_ms and (not end or at_ms < end)

    @property
    def rule(self) -> KindRule:
        return KINDS[self.kind]

    def to_json(self) -> str:
        d = self._short()
        return json.dumps(d, ensure_ascii=False, separators=(",", ":"))

    def _short(self) -> dict:
        return {"id": self.sanction_id, "k": self.kind, "j": self.subject, "s": self.subject_id,
                "f": self.valid_from_ms, "u": self.valid_until_ms, "r": self.reason, "ref": self.reference,
                "a": self.actor, "c": self.created_at_ms, "rq": self.request_id, "d": self.digest,
                "l": self.lifted_at_ms, "lb": self.lifted_by, "lr": self.lift_reason}

    @classmethod
    def from_json(cls, text: str) -> "Sanction":
        d = json.loads(text)
        return cls(d["id"], d["k"], d["j"], d["s"], int(d["f"]), int(d["u"]), d["r"], d["ref"], d["a"],
                   int(d["c"]), d.get("rq", ""), d.get("d", ""), int(d.get("l", 0)), d.get("lb", ""),
                   d.get("lr", ""))

    def notice(self) -> "Notice":
        return Notice(self.rule.refusal, self.kind, self.sanction_id, self.since_ms, self.valid_until_ms,
                      self.reference, self.subject_id)


@dataclass(frozen=True, slots=True)
class Notice:
    """A sanction in force against a settlement's site or person: what a refusal (ErrorInfo) and a
    CheckCodes answer (SanctionNotice) carry."""
    reason: str  # SITE_SANCTIONED or INSURED_SANCTIONED
    kind: str
    sanction_id: str
    since_ms: int
    until_ms: int  # 0: until lifted
    reference: str
    subject_id: str  # the site, or the pseudonym (kept from the POS: it only names the site)


def order(notices: Iterable[Notice]) -> list[Notice]:
    """Site sanctions first, then by start: the first one names a refusal."""
    return sorted(notices, key=lambda n: (n.reason != SITE_SANCTIONED, n.since_ms, n.sanction_id))


def message(notices: Sequence[Notice], tz: ZoneInfo) -> str:
    """What a pharmacist reads when a settlement is refused."""
    first = notices[0]
    rule = KINDS[first.kind]
    who = f"site {first.subject_id}" if rule.subject == SITE else "the insured person"
    until = f" until {_fmt(first.until_ms, tz)}" if first.until_ms else " until lifted"
    ref = f" (reference {first.reference})" if first.reference else ""
    more = f"; {len(notices) - 1} more sanction(s) apply" if len(notices) > 1 else ""
    return (f"settlement refused, nothing recorded: {rule.says} ({rule.label}) for {who} since "
            f"{_fmt(first.since_ms, tz)}{until}{ref}{more}")


def _fmt(ms: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ms / 1000, tz).isoformat(timespec="seconds")


# ------------------------------------------------------------------ requests

@dataclass(frozen=True, slots=True)
class SetRequest:
    """A validated SetSanction request (the pseudonym already computed)."""
    request_id: str
    kind: str
    subject: str
    subject_id: str
    valid_from_ms: int | None  # None: now
    valid_until_ms: int
    reason: str
    reference: str
    actor: str

    def digest(self) -> str:
        """The body's fingerprint for request_id idempotency (valid_from unset stays unset, so a
        retry later is the same body)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([self.kind, self.subject, self.subject_id,
                             -1 if self.valid_from_ms is None else self.valid_from_ms, self.valid_until_ms,
                             self.reason, self.reference, self.actor], ensure_ascii=False).encode())
        return h.hexdigest()

    def sanction_id(self) -> str:
        return "sx-" + hashlib.blake2b(self.request_id.encode(), digest_size=10).hexdigest()


def validate_set(*, request_id: str, kind: str | None, site_id: str, insured_id: str,
                 valid_from_ms: int | None, valid_until_ms: int | None, reason: str, reference: str,
                 actor: str, now_ms: int, pseudonym: Callable[[str], str], insured_pseudonym: str = "",
                 key_id: str = "") -> SetRequest:
    """A SetSanction request's fields -> SetRequest, or InvalidRequest naming every bad field.
    `kind` is the SanctionKind name (None when the number is unknown or unspecified)."""
    bad: list[tuple[str, str]] = []
    if not _REQUEST_ID.match(request_id or ""):
        bad.append(("request_id", f"required: 1-{MAX_REQUEST_ID} characters of A-Z a-z 0-9 . _ : -"))
    rule = KINDS.get(kind or "")
    if rule is None:
        bad.append(("kind", "required: one of " + ", ".join(KINDS)))
    subject_id = ""
    if rule is not None and rule.subject == SITE:
        if insured_id or insured_pseudonym:
            bad.append(("insured_id", f"{kind} is a site sanction: give site_id only"))
        if not _SITE_ID.match(site_id or ""):
            bad.append(("site_id", f"required for {kind}: 1-64 characters of A-Z a-z 0-9 . _ -"))
        subject_id = site_id
    elif rule is not None:
        if site_id:
            bad.append(("site_id", f"{kind} is a person sanction: give insured_id only"))
        if insured_pseudonym:
            if insured_id:
                bad.append(("insured_pseudonym", "give insured_id or insured_pseudonym, not both"))
            elif not (Pseudonymizer.looks_like_pseudonym(insured_pseudonym)
                      and insured_pseudonym.split(".", 1)[0] == key_id):
                bad.append(("insured_pseudonym", f"not a pseudonym of this deployment's key ({key_id}.<32 hex>)"))
            else:
                subject_id = insured_pseudonym
        else:
            try:
                norm = insured.check(insured_id)
            except insured.InsuredIdError as exc:
                bad.append(("insured_id", exc.rule))
            else:
                if not norm:
                    bad.append(("insured_id", f"required for {kind}: the insured person's id as read"))
                else:
                    subject_id = pseudonym(norm)
    for name, instant in (("valid_from", valid_from_ms), ("valid_until", valid_until_ms)):
        if instant is not None and not 0 < instant < MAX_TIME_MS:
            bad.append((name, "outside 1970-01-01 .. 2100-01-01 UTC"))
    if valid_until_ms is not None:
        if rule is not None and not rule.may_end:
            bad.append(("valid_until", f"{kind} binds until lifted: leave valid_until unset"))
        elif valid_until_ms <= (valid_from_ms if valid_from_ms is not None else now_ms):
            bad.append(("valid_until", "must be after valid_from (unset valid_from: now)"))
    bad += text_problems((("reason", reason, MAX_REASON, False), ("reference", reference, MAX_REFERENCE, False),
                          ("actor", actor, MAX_ACTOR, False)))
    if not reason.strip():
        bad.append(("reason", "required: why (kept with the sanction and shown in its history)"))
    if bad or rule is None or kind is None:
        raise InvalidRequest(bad)
    return SetRequest(request_id, kind, rule.subject, subject_id, valid_from_ms, valid_until_ms or 0,
                      reason, reference, actor)


def validate_lift(sanction_id: str, reason: str, actor: str) -> None:
    bad = []
    if not _SANCTION_ID.match(sanction_id or ""):
        bad.append(("sanction_id", "required: a sanction id as SetSanction returned it (sx-...)"))
    bad += text_problems((("reason", reason, MAX_REASON, False), ("actor", actor, MAX_ACTOR, False)))
    if bad:
        raise InvalidRequest(bad)


def validate_insured(insured_id: str, field_name: str = "insured_id") -> str:
    """The normalised id ('' when absent: none given, or only spaces), or InvalidRequest naming the
    field and the rule it breaks (rules/insured.py), never the id."""
    try:
        return insured.check(insured_id)
    except insured.InsuredIdError as exc:
        raise InvalidRequest([(field_name, exc.rule)]) from None


# ------------------------------------------------------------------ a process's view

@dataclass(slots=True)
class _Index:
    by_id: dict[str, Sanction] = field(default_factory=dict)
    # A tuple per subject (nearly always of one entry): a dict each would double the view.
    by_subject: dict[tuple[str, str], tuple[Sanction, ...]] = field(default_factory=dict)

    def put(self, s: Sanction) -> None:
        # A view holds every entry ever (110,000 in the benchmark): the idempotency fields are
        # not needed here, and the few distinct kinds, subjects, reasons and actors are shared.
        s = replace(s, request_id="", digest="", kind=sys.intern(s.kind), subject=sys.intern(s.subject),
                    reason=sys.intern(s.reason), actor=sys.intern(s.actor), lifted_by=sys.intern(s.lifted_by))
        self.by_id[s.sanction_id] = s
        key = (s.subject, s.subject_id)
        self.by_subject[key] = tuple(x for x in self.by_subject.get(key, ()) if x.sanction_id != s.sanction_id) + (s,)


class SanctionView:
    """Every sanction entry (lifted ones too), kept current from the store's change stream by one
    thread per process. `age_s()` is how long ago the view was last known complete; a view older
    than `max_age_s` is stale (docs/scaling.md, "Sanctions on a cluster").

    feed: an object with `snapshot() -> (stream id, [Sanction])` and
    `changes(after_id, block_ms) -> (last id, [Sanction])` (store.sanctions.SanctionStore)."""

    def __init__(self, feed, *, max_age_s: float = 1.0, block_ms: int = 200,
                 clock: Callable[[], float] = time.monotonic):
        self.feed, self.max_age_s, self.block_ms, self.clock = feed, max_age_s, block_ms, clock
        self._index = _Index()
        self._lock = threading.Lock()
        self._synced: float | None = None  # monotonic time the view was last complete
        self._cursor: str | None = None
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- feeding
    def load(self) -> None:
        """Take a snapshot (the stream position first, then the entries: a change in between is
        read again from the stream, and applying an entry twice is harmless)."""
        started = self.clock()
        cursor, entries = self.feed.snapshot()
        index = _Index()
        for s in entries:
            index.put(s)
        with self._lock:
            self._index, self._cursor, self._synced = index, cursor, started

    def poll(self) -> int:
        """Read the changes since the cursor (blocking up to block_ms); returns how many."""
        started = self.clock()
        cursor, entries = self.feed.changes(self._cursor, self.block_ms)
        with self._lock:
            for s in entries:
                self._index.put(s)
            self._cursor, self._synced = cursor, started
        return len(entries)

    def start(self) -> "SanctionView":
        self._thread = threading.Thread(target=self._run, name="tracecode-sanctions", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._thread and self._thread.is_alive():
            self._thread.join(self.block_ms / 1000 + 3)

    def _run(self) -> None:
        failing = False
        while not self.stopping.is_set():
            try:
                if self._cursor is None:
                    self.load()
                else:
                    self.poll()
                if failing:
                    log.info("sanction view: fresh again")
                failing = False
            except Exception as exc:  # noqa: BLE001 - keep trying; staleness is reported
                if not failing:
                    log.warning("sanction view: cannot read the sanction changes (%s); age grows", exc)
                failing = True
                # Reload everything once reads work again: the change stream is trimmed, so
                # after a long outage following it from the old position could miss changes.
                self._cursor = None
                self.stopping.wait(0.2)

    # -- reading
    def age_s(self) -> float:
        synced = self._synced
        return float("inf") if synced is None else max(self.clock() - synced, 0.0)

    def fresh(self) -> bool:
        return self.age_s() <= self.max_age_s

    def _entries(self, site: str, insured: str) -> list[Sanction]:
        idx = self._index
        out = list(idx.by_subject.get((SITE, site), ())) if site else []
        if insured:
            out += idx.by_subject.get((INSURED, insured), ())
        return out

    def binding_now(self, site: str, insured: str, now_ms: int) -> list[Notice]:
        return order(s.notice() for s in self._entries(site, insured) if s.binds_now(now_ms))

    def binding_at(self, site: str, insured: str, at_ms: int) -> list[Notice]:
        return order(s.notice() for s in self._entries(site, insured) if s.in_force_at(at_ms))

    def get(self, sanction_id: str) -> Sanction | None:
        return self._index.by_id.get(sanction_id)

    def __len__(self) -> int:
        return len(self._index.by_id)


def lifted(s: Sanction, *, now_ms: int, by: str, reason: str) -> Sanction:
    return replace(s, lifted_at_ms=now_ms, lifted_by=by, lift_reason=reason)


def notices_from_json(text: str) -> list[Notice]:
    """Entries as gate.lua returns them (a JSON list of entry JSON strings) -> notices."""
    return order(Sanction.from_json(e).notice() for e in json.loads(text))


__all__ = ["KINDS", "KindRule", "Sanction", "Notice", "SetRequest", "SanctionView", "validate_set",
           "validate_lift", "validate_insured", "message", "order", "lifted", "notices_from_json",
           "SITE", "INSURED", "SITE_SANCTIONED", "INSURED_SANCTIONED"]
