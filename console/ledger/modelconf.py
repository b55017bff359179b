"""The models' configuration through the ledger (issue 27): a candidate configuration is proposed
with its backtest report, adopted by a second person (proposer ≠ approver, as sanctions are), and
the adopted one is what the leads engine's next run reads (`tracecode console models-config
--out models.toml`, then `tracecode leads ... --config models.toml`). The conclusions export
(`tracecode console conclusions`, /models/conclusions.csv) is the backtest's `--conclusions`.

A proposal's TOML is validated by the engine's own loader (tracecode.leads.config.load), so the
console never adopts a file the engine would refuse. Rows are never deleted: a rejected or
superseded configuration stays with who proposed, approved or rejected it and when.

May import: Django, the ledger app, tracecode.leads.config and tracecode.leads.backtest (tables
and the loader; no engine).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile

from django.db import transaction
from django.utils import timezone

from tracecode.leads.backtest import CONCLUSION_FIELDS, REPORT_FIELDS
from tracecode.rules.text import text_problem

from .models import Lead, ModelConfig
from .roles import has
from .rules import Perm, Source, is_concluded, is_confirmed
from .workflow import Forbidden, RuleError

MAX_TOML = 64 * 1024
MAX_REPORT = 4 * 1024 * 1024
EXPORT_FIELDS = (*CONCLUSION_FIELDS, "subject_kind", "cause", "ledger_ref")


def validate_toml(text: str) -> str:
    """The engine's loader says whether it is a configuration; its message, not a traceback."""
    from tracecode.leads.config import load
    if len(text.encode("utf-8")) > MAX_TOML:
        raise RuleError(f"配置文件超过 {MAX_TOML // 1024} KB")
    # Lines and tabs are TOML's own; any other control or format character is refused.
    bad = text_problem(text.replace("\r\n", "\n").replace("\n", " ").replace("\t", " "), MAX_TOML, "toml", required=False)
    if bad:
        raise RuleError(f"配置文件含不允许的字符（{bad}）")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, encoding="utf-8") as fh:
        fh.write(text)
        path = fh.name
    try:
        load(path)
    except (ValueError, TypeError) as exc:
        raise RuleError("配置无效：" + str(exc).replace(path, "配置文件")) from None
    finally:
        os.unlink(path)
    return text


def read_report(text: str) -> list[dict]:
    """A backtest.json (leads/backtest.py) as rows of REPORT_FIELDS; '' is no report."""
    if not text.strip():
        return []
    if len(text) > MAX_REPORT:
        raise RuleError("回测报告过大")
    try:
        doc = json.loads(text)
        rows = [{f: m[f] for f in (*REPORT_FIELDS, "confirmed_missed_subjects", "unfounded_dropped_subjects")}
                for m in doc["models"]]
    except (ValueError, KeyError, TypeError):
        raise RuleError("回测报告不是 tracecode leads backtest 写出的 backtest.json") from None
    return rows


@transaction.atomic
def propose(toml_text: str, report_json: str, reason: str, actor) -> ModelConfig:
    if not has(actor, Perm.PROPOSE_CONFIG):
        raise Forbidden("无权提议模型配置")
    text = validate_toml(toml_text)
    read_report(report_json)
    bad = text_problem(reason.strip().replace("\r\n", "\n").replace("\n", " "), 2000, "reason")
    if bad:
        raise RuleError(f"变更理由：{bad}" if reason.strip() else "请填写变更理由")
    return ModelConfig.objects.create(toml=text, sha256=hashlib.sha256(text.encode()).hexdigest(),
                                      report=report_json, reason=reason.strip(), proposed_by=actor)


def _decidable(cfg: ModelConfig, actor) -> ModelConfig:
    if not has(actor, Perm.APPROVE_CONFIG):
        raise Forbidden("无权审批模型配置")
    cfg = ModelConfig.objects.select_for_update().get(pk=cfg.pk)
    if cfg.proposed_by_id == actor.id:
        raise Forbidden("不能审批本人提议的模型配置（须由另一名审核人批准）")
    if cfg.state != ModelConfig.PROPOSED:
        raise RuleError(f"该配置的状态为「{cfg.state_label}」，不能再审批")
    return cfg


@transaction.atomic
def adopt(cfg: ModelConfig, actor) -> ModelConfig:
    """The second person's yes: this configuration becomes the one in force; the one before is
    marked superseded (both rows stay)."""
    cfg = _decidable(cfg, actor)
    now = timezone.now()
    ModelConfig.objects.select_for_update().filter(state=ModelConfig.ADOPTED).update(
        state=ModelConfig.SUPERSEDED, superseded_at=now)
    cfg.state, cfg.decided_by, cfg.decided_at = ModelConfig.ADOPTED, actor, now
    cfg.save()
    return cfg


@transaction.atomic
def reject(cfg: ModelConfig, actor, reason: str) -> ModelConfig:
    cfg = _decidable(cfg, actor)
    cfg.state, cfg.decided_by, cfg.decided_at = ModelConfig.REJECTED, actor, timezone.now()
    cfg.decision_note = reason.strip()
    cfg.save()
    return cfg


def adopted() -> ModelConfig | None:
    return ModelConfig.objects.filter(state=ModelConfig.ADOPTED).order_by("-decided_at").first()


def conclusions_csv() -> str:
    """Every concluded engine lead: finding CONFIRMED (查证属实 with a fraud cause) or UNFOUNDED
    (everything else concluded, technical causes included), as the weekly report counts them."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(EXPORT_FIELDS)
    leads = (Lead.objects.filter(source=Source.MODEL.value).order_by("model", "subject_id", "ref")
             .prefetch_related("hits"))
    for ld in leads:
        if not is_concluded(ld.status):
            continue
        engine_ids = sorted(h.external.split(":", 1)[1] for h in ld.hits.all() if h.external.startswith("MODEL:"))
        w.writerow([engine_ids[0] if engine_ids else ld.ref, ld.model, ld.model_version, ld.subject_id,
                    "CONFIRMED" if is_confirmed(ld.status, ld.cause) else "UNFOUNDED", ld.subject_kind, ld.cause,
                    ld.ref])
    return out.getvalue()
