"""A leads model version's status (spec leads.md, Proven models): one table that the leads engine
(leads/config.py, leads.csv `model_status`) and the console (Lead.model_status, its labels and
counts) both read, so neither restates the other's codes.

Standard library only, like the rest of the rules core.
"""
from __future__ import annotations

PILOT, PRODUCTION, RETIRED = "PILOT", "PRODUCTION", "RETIRED"
# code -> the console's label. A file from before statuses existed carries none: its leads were
# all from models in use, so the console reads a missing status as PRODUCTION.
STATUSES = {PILOT: "试点", PRODUCTION: "在用", RETIRED: "停用"}
DEFAULT = PRODUCTION
