"""The models' table: name, version, status, subject, thresholds, risk cut-offs, summary templates.

Data, not code: `docs/leads.md` documents each row; a TOML file given with `--config` overrides
thresholds, cut-offs and the status per model (`[RESALE_BUYER] min_packs = 2`, `status = "PILOT"`).
STOCKPILING's and RESALE_SOURCE's thresholds and versions are the live rules' too (rules/live.py,
judged at the counter by `tracecode serve --models-config` with the same file); their live-only
keys (`live`, `live_window_hours`) are skipped here. Changing a rule means bumping its `version`,
which changes its lead ids (a ledger keeps old and new apart). The status (试点 / 在用 / 停用) is
the version's standing: a pilot's leads are marked as such in leads.csv and the ledger and counted apart; a retired model writes no leads.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field

from tracecode.rules import live
from tracecode.rules.model_status import DEFAULT as DEFAULT_STATUS
from tracecode.rules.model_status import STATUSES

# How a summary names an amount, per language: (known amount, unknown amount). The templates
# below fill `{amount_text}` from this, so no template holds a unit or a fallback of its own.
AMOUNT_TEXT = {"zh": ("{amount} 元", "金额不详"), "en": ("{amount} yuan", "an unknown amount")}


@dataclass(frozen=True)
class Model:
    name: str
    version: int
    subject_kind: str  # SITE, INSURED or RING
    params: dict
    # (lowest score, risk), highest first: the first whose bound the score reaches.
    risk: tuple
    # str.format templates over the lead's figures: leads.csv `summary` (the console shows it)
    # and `summary_en` (logs, exports, readers without Chinese).
    summary_zh: str
    summary_en: str
    status: str = DEFAULT_STATUS  # a key of rules.model_status.STATUSES


MODELS: dict[str, Model] = {m.name: m for m in (
    Model("RESALE_BUYER", 1, "SITE", {"min_packs": 1},
          ((10, "HIGH"), (3, "MEDIUM"), (0, "LOW")),
          "机构 {subject_id} 销售了 {packs_resold} 盒已在其他 {other_sites} 家机构发药的药品，"
          "医保基金重复支付：{amount_text}。",
          "Site {subject_id} sold {packs_resold} pack(s) already dispensed at {other_sites} other site(s); "
          "the fund paid {amount_text} a second time."),
    # Shared with the live rule at the counter (rules/live.py): one definition of its thresholds.
    Model("RESALE_SOURCE", live.VERSIONS["RESALE_SOURCE"], "INSURED", dict(live.DEFAULTS["RESALE_SOURCE"]),
          ((10, "HIGH"), (4, "MEDIUM"), (0, "LOW")),
          "参保人 {subject_id} 购得的 {packs_resold} 盒药品在其他 {other_sites} 家机构被再次销售。",
          "{packs_resold} pack(s) dispensed to insured person {subject_id} were sold again at "
          "{other_sites} other site(s)."),
    Model("RING", 1, "RING", {"min_sites": 3},
          ((20, "HIGH"), (6, "MEDIUM"), (0, "LOW")),
          "{sites} 家机构相互倒卖药品：沿其间 {edges} 条关联倒卖 {packs_resold} 盒。",
          "{sites} sites resell each other's packs: {packs_resold} pack(s) resold along "
          "{edges} link(s) among them."),
    Model("STOCKPILING", live.VERSIONS["STOCKPILING"], "INSURED", dict(live.DEFAULTS["STOCKPILING"]),
          ((20, "HIGH"), (10, "MEDIUM"), (0, "LOW")),
          "参保人 {subject_id} 在 {window_days:g} 天内于 {sites} 家机构购买产品 {products} 共 {score:g} 盒（超量囤药）。",
          "Insured person {subject_id} bought {score:g} packs of product {products} at {sites} sites "
          "within {window_days:g} days."),
    Model("SWAP", 1, "SITE", {"min_lines": 3},
          ((20, "HIGH"), (8, "MEDIUM"), (0, "LOW")),
          "机构 {subject_id} 有 {lines} 条结算明细所报药品与追溯码赋码药品不符（串换）。",
          "Site {subject_id} billed {lines} line(s) for a product other than the one the pack was "
          "issued for (串换)."),
    # A site selling packs it never received through the receiving check (入库核验): only sites
    # that use the check are judged (receiving_sites_only), and only with receipts given.
    Model("UNRECEIVED", 1, "SITE", {"min_packs": 3, "receiving_sites_only": 1},
          ((20, "HIGH"), (8, "MEDIUM"), (0, "LOW")),
          "机构 {subject_id} 销售了 {packs_unreceived} 盒无本机构入库核验记录的药品（来源不明/无随货同行单）。",
          "Site {subject_id} sold {packs_unreceived} pack(s) it never received through the receiving check "
          "(no delivery note of its own)."),
    Model("ABNORMAL_SITE", 1, "SITE", {"min_z": 3.5, "min_flagged": 10, "min_peers": 10},
          ((10, "HIGH"), (5, "MEDIUM"), (0, "LOW")),
          "机构 {subject_id} 的 {total} 条明细中 {flagged} 条被标记（{rate:.1%}），同类 {peers} 家机构中位数 "
          "{median:.1%}；稳健 z 值 {score_text}。",
          "Site {subject_id} flagged {flagged} of {total} lines ({rate:.1%}) against a peer median "
          "of {median:.1%} ({peers} peers); robust z {score_text}."),
)}


@dataclass(frozen=True)
class LeadsConfig:
    models: dict = field(default_factory=lambda: dict(MODELS))
    top_network_leads: int = 25  # sites of the top resale leads drawn in network.png

    def model(self, name: str) -> Model:
        return self.models[name]


def load(path: str | None) -> LeadsConfig:
    """Defaults, overridden by a TOML file: one table per model with `version`, `status`
    (PILOT, PRODUCTION or RETIRED), thresholds by name, and `risk = [[bound, "HIGH"], ...]`. An unknown model or threshold is an error."""
    cfg = LeadsConfig()
    if not path:
        return cfg
    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    models = dict(cfg.models)
    top = doc.pop("top_network_leads", cfg.top_network_leads)
    for name, over in doc.items():
        if name not in models:
            raise ValueError(f"{path}: unknown model {name!r} (known: {', '.join(models)})")
        m = models[name]
        params = dict(m.params)
        changes: dict[str, object] = {}
        for k, v in over.items():
            if k == "version":
                changes["version"] = int(v)
            elif k == "status":
                if v not in STATUSES:
                    raise ValueError(f"{path}: model {name} status {v!r} (known: {', '.join(STATUSES)})")
                changes["status"] = v
            elif k in live.LIVE_KEYS and name in live.MODELS:
                continue  # the live rule's own settings (rules/live.py reads them from this file)
            elif k == "risk":
                changes["risk"] = tuple((float(b), str(r)) for b, r in v)
            elif k in params:
                params[k] = type(params[k])(v)
            else:
                raise ValueError(f"{path}: model {name} has no threshold {k!r} (known: {', '.join(params)})")
        models[name] = dataclasses.replace(m, params=params, **changes)
    return LeadsConfig(models=models, top_network_leads=int(top))
