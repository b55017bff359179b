"""The models' table: name, version, subject, thresholds, risk cut-offs, summary template.

Data, not code: `docs/leads.md` documents each row; a TOML file given with `--config` overrides
thresholds and cut-offs per model (`[RESALE_BUYER] min_packs = 2`). Changing a rule means
bumping its `version`, which changes its lead ids (a ledger keeps old and new apart).
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field

# Verdicts that count as flagged for ABNORMAL_SITE (MALFORMED and DUPLICATE_IN_REQUEST are counter
# mistakes, not fraud signals: leads.md).
FLAGGED_VERDICTS = ("DUPLICATE", "UNKNOWN", "BLOCKED", "PRODUCT_MISMATCH", "EXPIRED", "QUANTITY_EXCEEDED")


@dataclass(frozen=True)
class Model:
    name: str
    version: int
    subject_kind: str  # SITE, INSURED or RING
    params: dict
    # (lowest score, risk), highest first: the first whose bound the score reaches.
    risk: tuple
    summary: str  # str.format template over the lead's figures


MODELS: dict[str, Model] = {m.name: m for m in (
    Model("RESALE_BUYER", 1, "SITE", {"min_packs": 1},
          ((10, "HIGH"), (3, "MEDIUM"), (0, "LOW")),
          "Site {subject_id} sold {packs_resold} pack(s) already dispensed at {other_sites} other site(s); "
          "the fund paid {amount_text} a second time."),
    Model("RESALE_SOURCE", 1, "INSURED", {"min_packs": 2},
          ((10, "HIGH"), (4, "MEDIUM"), (0, "LOW")),
          "{packs_resold} pack(s) dispensed to insured person {subject_id} were sold again at "
          "{other_sites} other site(s)."),
    Model("RING", 1, "RING", {"min_sites": 3},
          ((20, "HIGH"), (6, "MEDIUM"), (0, "LOW")),
          "{sites} sites resell each other's packs: {packs_resold} pack(s) resold along "
          "{edges} link(s) among them."),
    Model("STOCKPILING", 1, "INSURED", {"min_packs": 6, "min_sites": 3, "window_hours": 720},
          ((20, "HIGH"), (10, "MEDIUM"), (0, "LOW")),
          "Insured person {subject_id} bought {score:g} packs of product {products} at {sites} sites "
          "within {window_days:g} days."),
    Model("SWAP", 1, "SITE", {"min_lines": 3},
          ((20, "HIGH"), (8, "MEDIUM"), (0, "LOW")),
          "Site {subject_id} billed {lines} line(s) for a product other than the one the pack was "
          "issued for (串换)."),
    Model("ABNORMAL_SITE", 1, "SITE", {"min_z": 3.5, "min_flagged": 10, "min_peers": 10},
          ((10, "HIGH"), (5, "MEDIUM"), (0, "LOW")),
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
    """Defaults, overridden by a TOML file: one table per model with `version`, thresholds by
    name, and `risk = [[bound, "HIGH"], ...]`. An unknown model or threshold is an error."""
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
            elif k == "risk":
                changes["risk"] = tuple((float(b), str(r)) for b, r in v)
            elif k in params:
                params[k] = type(params[k])(v)
            else:
                raise ValueError(f"{path}: model {name} has no threshold {k!r} (known: {', '.join(params)})")
        models[name] = dataclasses.replace(m, params=params, **changes)
    return LeadsConfig(models=models, top_network_leads=int(top))
