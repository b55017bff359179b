"""The live rules: two of the leads engine's proven models judged at the counter (事中审核).

STOCKPILING: the person has bought one product (the issuance record's product) at >= min_sites
distinct sites, >= min_packs distinct packs, within the last window_hours, counting this
settlement's OK lines. RESALE_SOURCE: >= min_packs distinct packs first dispensed to the person
were later sold again at another site (a DUPLICATE there credits the first buyer), within the last
live_window_hours. The same rules as the batch models of docs/leads.md, judged as each settlement
arrives (in settled_at order the first settlement at which the batch rule holds is the one that
gets the notice).

One configuration file sets the thresholds of the batch models and of the live rules: the leads
engine's TOML (`tracecode leads --config`, `tracecode serve --models-config`). The thresholds and
versions are its `[STOCKPILING]` and `[RESALE_SOURCE]` tables (leads/config.py takes its defaults
from DEFAULTS here); the live-only keys of those tables are LIVE_KEYS, which the batch engine
ignores:

    live = "NOTICE"            NOTICE (default): a notice on the answer; REFUSE: FAILED_PRECONDITION,
                               nothing marked; OFF: not judged at the counter
    live_window_hours = 2160   RESALE_SOURCE only: how long a resold pack counts against its first
                               buyer (the person's state expires with it)

Per-person state is keyed by pseudonym only and bounded (MAX_ENTRIES, a sliding window, keys that
expire); `person_tag` is the hash tag it lives under (the same rule in Lua: server/store/lua/_live.lua).

Imports: the standard library only.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

__all__ = ["MODELS", "DEFAULTS", "VERSIONS", "LIVE_KEYS", "ACTIONS", "MAX_ENTRIES", "RuleConfig", "LiveRules",
           "load", "person_tag", "notice_text", "UNJUDGED_TEXT"]

MODELS = ("STOCKPILING", "RESALE_SOURCE")
# The batch models' thresholds (leads/config.py builds its table from these) and versions.
DEFAULTS: dict[str, dict] = {
    "STOCKPILING": {"min_packs": 6, "min_sites": 3, "window_hours": 720},
    "RESALE_SOURCE": {"min_packs": 2},
}
VERSIONS = {"STOCKPILING": 1, "RESALE_SOURCE": 1}
LIVE_KEYS = ("live", "live_window_hours")
ACTIONS = {"NOTICE": "N", "REFUSE": "R", "OFF": "O"}
DEFAULT_RESALE_WINDOW_HOURS = 2160  # 90 days
# Most entries one person's STOCKPILING window keeps (the oldest go first): ~60 bytes each.
MAX_ENTRIES = 256

_HEX3 = re.compile(r"\.([0-9a-fA-F]{3})")


@dataclass(frozen=True)
class RuleConfig:
    model: str
    version: int
    action: str  # NOTICE, REFUSE or OFF
    params: dict
    window_hours: float  # how long the person's state for this rule counts (and lives)


@dataclass(frozen=True)
class LiveRules:
    rules: dict = field(default_factory=dict)  # model -> RuleConfig
    enabled: bool = True

    def rule(self, model: str) -> RuleConfig:
        return self.rules[model]

    @property
    def active(self) -> bool:
        return self.enabled and any(r.action != "OFF" for r in self.rules.values())

    @property
    def refusing(self) -> bool:
        return self.enabled and any(r.action == "REFUSE" for r in self.rules.values())

    def lua_arg(self, prefix: str, mode: str) -> str:
        """The scripts' configuration argument (lua/_live.lua live_parse): mode ('J' judge in
        this call, 'C' collect the first buyers of DUPLICATEs for a second call), then per rule its
        action letter, thresholds, window in ms and version, the key prefix and MAX_ENTRIES."""
        sp, rs = self.rules["STOCKPILING"], self.rules["RESALE_SOURCE"]
        return "|".join(str(v) for v in (
            mode, ACTIONS[sp.action], sp.params["min_packs"], sp.params["min_sites"],
            int(sp.window_hours * 3_600_000), sp.version, ACTIONS[rs.action], rs.params["min_packs"],
            int(rs.window_hours * 3_600_000), rs.version, prefix, MAX_ENTRIES))


def _defaults() -> dict:
    return {
        "STOCKPILING": RuleConfig("STOCKPILING", VERSIONS["STOCKPILING"], "NOTICE", dict(DEFAULTS["STOCKPILING"]),
                                  float(DEFAULTS["STOCKPILING"]["window_hours"])),
        "RESALE_SOURCE": RuleConfig("RESALE_SOURCE", VERSIONS["RESALE_SOURCE"], "NOTICE",
                                    dict(DEFAULTS["RESALE_SOURCE"]), float(DEFAULT_RESALE_WINDOW_HOURS)),
    }


def load(path: str | None, enabled: bool = True) -> LiveRules:
    """The live rules of a leads configuration file (None: the defaults). Only the two models'
    tables are read here; the leads engine's loader checks the rest of the file. A wrong key or
    value is a ValueError naming the file, table and key."""
    rules = _defaults()
    if not path:
        return LiveRules(rules, enabled)
    with open(path, "rb") as fh:
        try:
            doc = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: {exc}") from None
    for model in MODELS:
        over = doc.get(model)
        if over is None:
            continue
        if not isinstance(over, dict):
            raise ValueError(f"{path}: [{model}] must be a table")
        r = rules[model]
        params, version, action, window = dict(r.params), r.version, r.action, r.window_hours
        for k, v in over.items():
            where = f"{path}: [{model}] {k}"
            if k == "version":
                version = _num(where, v, int)
            elif k == "live":
                if not isinstance(v, str) or v.upper() not in ACTIONS:
                    raise ValueError(f"{where} = {v!r}: one of {', '.join(ACTIONS)}")
                action = v.upper()
            elif k == "live_window_hours" and model == "RESALE_SOURCE":
                window = _num(where, v, float)
            elif k in params:
                params[k] = _num(where, v, type(params[k]))
                if k == "window_hours":
                    window = float(params[k])
            elif k in ("status", "risk"):
                continue  # the batch engine's (leads/config.py)
            else:
                raise ValueError(f"{where}: unknown key (known: {', '.join([*params, 'version', 'status', 'risk', 'live'])}"
                                 + (", live_window_hours)" if model == "RESALE_SOURCE" else ")"))
        rules[model] = RuleConfig(model, version, action, params, window)
    return LiveRules(rules, enabled)


def _num(where: str, v, kind):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (kind is int and v != int(v)):
        raise ValueError(f"{where} = {v!r}: a positive {'whole ' if kind is int else ''}number")
    return kind(v)


def person_tag(pseudonym: str) -> str:
    """The hash tag (rules.schema.TAGS) a person's live state lives under: from the first three
    hex digits of the pseudonym's MAC, so Lua computes it too (lua/_live.lua live_tag); a
    pseudonym without them (never made by the server) falls in tag 0."""
    m = _HEX3.search(pseudonym)
    return "{%04d}" % (int(m.group(1), 16) % 1024 if m else 0)


# What the pharmacist reads (Chinese), per model: str.format over the notice's figures.
_TEXTS = {
    "STOCKPILING": "提醒：该参保人 {window_days:g} 天内已在 {sites} 家机构购买产品 {product_id} 共 {packs} 盒（含本次），"
                   "疑似超量囤药，请核实购药需求（规则 STOCKPILING 第 {version} 版）。",
    "RESALE_SOURCE": "提醒：该参保人此前购得的 {packs} 盒药品已在其他机构被再次销售，疑似倒卖医保药品，"
                     "请核实（规则 RESALE_SOURCE 第 {version} 版）。",
}
_REFUSED = "拒绝结算："
UNJUDGED_TEXT = "提示：规则 {model} 本次未能判断（存储暂不可用），结算不受影响。"


def notice_text(model: str, figures: dict, version: int, refused: bool = False) -> str:
    text = _TEXTS[model].format(version=version, **figures)
    return (_REFUSED + text.removeprefix("提醒：")) if refused else text
