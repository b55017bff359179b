"""SanctionService: what the servicers and the verifier ask about sanctions and insured persons.

It turns raw insured ids into pseudonyms (rules/insured.py and rules/pseudonym.py, the one function for it), imposes,
lifts and lists sanctions through the store (store/sanctions.py), and answers the settlement
path's questions: which gate mode the store's atomic call runs (one Redis node: the sanction
check is in that call, lua/gate.lua), and, where no atomic check is possible (a cluster), what
the server's SanctionView says, refusing to settle on a view older than its freshness bound.
Bulk jobs ask for the sanctions in force at a settlement's own time.

May import: the plain modules (sanctions, pseudonym, errors, metrics) and the store (its
sanction half, store/sanctions.py). No gRPC (api/sanctions.py translates).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Sequence
from zoneinfo import ZoneInfo

from . import metrics
from .errors import InvalidRequest, Sanctioned, SanctionViewStale, SettlementConflict
from tracecode.rules.pseudonym import Pseudonymizer, generate_key_file
from .store.sanctions import SanctionStore
from .sanctions import (INSURED, SITE, Notice, Sanction, SanctionView, message, notices_from_json,
                        validate_insured, validate_lift, validate_set)
from .store import now_ms

log = logging.getLogger("tracecode.sanctions")

KEY_FILE_NAME = "pseudonym.key"


def resolve_key_file(config) -> str:
    """The pseudonym key file of this deployment: `pseudonym_key_file` when set (it must exist),
    else `<data_dir>/pseudonym.key`, generated (mode 0600) on the first start."""
    if config.pseudonym_key_file:
        return config.pseudonym_key_file
    os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
    path = os.path.join(config.data_dir, KEY_FILE_NAME)
    try:
        generate_key_file(path)
        log.warning("generated a new insured-pseudonym key in %s: every server of this deployment must "
                    "use this same file (pseudonym_key_file); see docs/security.md", path)
    except FileExistsError:
        pass
    return path


class SanctionService:
    def __init__(self, store, pseudonymizer: Pseudonymizer, *, tz: ZoneInfo,
                 view: SanctionView | None = None, view_max_age_s: float = 1.0):
        self.sstore = SanctionStore(store)
        self.cluster = store.cluster
        self.pseudonymizer = pseudonymizer
        self.tz = tz
        self.view = view or SanctionView(self.sstore, max_age_s=view_max_age_s)

    def start(self) -> "SanctionService":
        try:
            self.view.load()  # before the first call where possible; the thread retries otherwise
        except Exception as exc:  # noqa: BLE001 - Redis may come up later; staleness is reported
            log.warning("sanction view: initial load failed (%s); retrying in the background", exc)
        self.view.start()
        return self

    def stop(self) -> None:
        self.view.stop()

    # ------------------------------------------------------------------ persons

    def pseudonym(self, insured_id: str, field_name: str = "insured_id") -> str:
        """The pseudonym of a raw id as the POS read it ('' for none, or only spaces); InvalidRequest
        naming the field and the rule when it is no insured id (rules/insured.py)."""
        if not insured_id:
            return ""
        norm = validate_insured(insured_id, field_name)
        return self.pseudonymizer.pseudonym(norm) if norm else ""

    # ------------------------------------------------------------------ settlement path

    def gate_mode(self, *, dispense: bool) -> str:
        """The mode of lua/gate.lua for a live call: enforce / notices on one node, '' on a
        cluster (the call's slots do not hold the sanctions; the view judges)."""
        if self.cluster:
            return ""
        return "E" if dispense else "N"

    def binding_now(self, site: str, insured: str) -> list[Notice]:
        """The view's sanctions binding a live settlement now; SanctionViewStale past the bound."""
        age = self.view.age_s()
        metrics.SANCTION_VIEW_AGE.set(min(age, 1e9))
        if age > self.view.max_age_s:
            metrics.SANCTION_STALE_REFUSALS.inc()
            raise SanctionViewStale(f"sanction view {age:.1f} s old, bound {self.view.max_age_s} s")
        return self.view.binding_now(site, insured, now_ms())

    def precheck(self, site: str, settlement_id: str, insured: str, digest: str):
        """Cluster: refuse a sanctioned settlement before the store marks anything. Returns the
        stored results of an identical settlement recorded earlier (a retry replays), else None."""
        notices = self.binding_now(site, insured)
        if not notices:
            return None
        stored = self.sstore.store.stored_settlement(site, settlement_id)
        if stored and stored.digest == digest:
            return stored.result
        self.sstore.audit_refusal(site, settlement_id, insured, notices[0], now_ms())
        exc = Sanctioned(notices)
        self.refused(exc)
        raise exc

    def refused(self, exc: Sanctioned) -> None:
        """A refusal (from gate.lua or precheck): decoded, counted, given its pharmacist's message."""
        if not exc.notices:
            exc.notices = notices_from_json(exc.entries_json)
        exc.text = message(exc.notices, self.tz)
        metrics.sanction_refused(exc.notices[0].reason)
        log.info("settlement refused: %s (sanction %s)", exc.notices[0].reason, exc.notices[0].sanction_id)

    def notices_of(self, entries: list[str]) -> list[Notice]:
        """The binding entries gate.lua added to a check's results (entry json strings)."""
        return notices_from_json(json.dumps(entries)) if entries else []

    def binding_at(self, site: str, insured: str, at_ms: int) -> list[Notice]:
        """Bulk jobs: the sanctions in force when the settlement was made."""
        return self.view.binding_at(site, insured, at_ms)

    def first_buyers(self, codes: Sequence[str], state=None) -> dict[str, str]:
        """Bulk jobs: code -> the pseudonym of its first dispense's buyer (in the job's namespace)."""
        return self.sstore.first_insured(codes, state)

    # ------------------------------------------------------------------ admin

    def set(self, *, request_id: str, kind: str | None, site_id: str, insured_id: str,
            valid_from_ms: int | None, valid_until_ms: int | None, reason: str, reference: str,
            actor: str, insured_pseudonym: str = "") -> Sanction:
        now = now_ms()
        req = validate_set(request_id=request_id, kind=kind, site_id=site_id, insured_id=insured_id,
                           valid_from_ms=valid_from_ms, valid_until_ms=valid_until_ms, reason=reason,
                           reference=reference, actor=actor, now_ms=now, pseudonym=self.pseudonymizer.pseudonym,
                           insured_pseudonym=insured_pseudonym, key_id=self.pseudonymizer.key_id)
        try:
            changed, s = self.sstore.set(req, now_ms=now)
        except SettlementConflict:
            raise SettlementConflict(f"request_id {request_id!r} was already used for another sanction; "
                                     "use a new request_id for a new sanction") from None
        if changed:
            metrics.sanction_changed("set")
            log.info("sanction %s set: %s on %s %s (reference %r, by %s)", s.sanction_id, s.kind, s.subject,
                     s.subject_id, s.reference, s.actor)
        return s

    def lift(self, sanction_id: str, reason: str, actor: str) -> Sanction:
        validate_lift(sanction_id, reason, actor)
        changed, s = self.sstore.lift(sanction_id, now_ms=now_ms(), by=actor, reason=reason)
        if changed:
            metrics.sanction_changed("lift")
            log.info("sanction %s lifted by %s", s.sanction_id, actor)
        return s

    def list(self, *, site_id: str, insured_id: str, insured_pseudonym: str, include_history: bool,
             reference: str) -> list[Sanction]:
        """Read from Redis (not the view): an operator sees their own change at once."""
        given = [(SITE, site_id), (INSURED, self.pseudonym(insured_id)), (INSURED, insured_pseudonym)]
        subjects = [(j, v) for j, v in given if v]
        if len(subjects) > 1:
            raise InvalidRequest([("site_id", "at most one of site_id, insured_id, insured_pseudonym")])
        now = now_ms()
        out = []
        for s in self.sstore.all():
            if subjects and (s.subject, s.subject_id) != subjects[0]:
                continue
            if reference and s.reference != reference:
                continue
            if include_history or s.binds_now(now):
                out.append(s)
        out.sort(key=lambda s: (s.created_at_ms, s.sanction_id), reverse=True)
        return out

    def in_force(self, s: Sanction) -> bool:
        return s.binds_now(now_ms())


__all__ = ["SanctionService", "resolve_key_file", "KEY_FILE_NAME"]
