"""ABNORMAL_SITE's peer statistics and RING's components: small tables, plain Python.

Both run over one row per site (or per site pair), whatever the engine, so they are written
once here rather than in two SQL dialects whose medians differ (exact vs approximate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median

import networkx as nx


@dataclass(frozen=True, slots=True)
class SiteScore:
    site_id: str
    total: int
    flagged: int
    rate: float
    median: float
    peers: int
    score: float  # robust z; +inf when the peers do not spread at all


def robust_scores(rates: list[tuple[str, int, int]], groups: dict[str, tuple[str, str]],
                  min_peers: int) -> list[SiteScore]:
    """Per site its robust z among its peers (leads.md): the sites of its (region, kind) when it is
    registered and that group has at least `min_peers` sites, else all sites. z = 0.6745 (x - med)
    / MAD; with MAD 0, (x - med) / (1.2533 * mean |x - med|) (the usual modified z-score with a
    mean absolute deviation); with that 0 too, +inf above the median (0 at it)."""
    rate_of = {s: (f / t if t else 0.0) for s, t, f in rates}
    by_group: dict[tuple[str, str], list[str]] = {}
    for s in rate_of:
        g = groups.get(s)
        if g:
            by_group.setdefault(g, []).append(s)
    everyone = sorted(rate_of)
    stats: dict[tuple, tuple[float, float, float, int]] = {}

    def stat(key, members):
        if key not in stats:
            xs = [rate_of[m] for m in members]
            med = median(xs)
            dev = [abs(x - med) for x in xs]
            stats[key] = (med, median(dev), sum(dev) / len(dev), len(xs))
        return stats[key]

    out = []
    for s, total, flagged in sorted(rates):
        g = groups.get(s)
        members = by_group.get(g) if g else None
        key, members = (g, members) if members and len(members) >= min_peers else (("*", "*"), everyone)
        med, mad, meanad, n = stat(key, members)
        x = rate_of[s]
        if mad > 0:
            z = 0.6745 * (x - med) / mad
        elif meanad > 0:
            z = (x - med) / (1.2533 * meanad)
        else:
            z = math.inf if x > med else 0.0
        out.append(SiteScore(s, total, flagged, x, med, n, z))
    return out


def rings(edges: list[tuple[str, str, int]], min_sites: int) -> list[list[str]]:
    """Strongly connected components of the site -> site resale graph with >= min_sites sites,
    each sorted, the list sorted."""
    g = nx.DiGraph()
    g.add_edges_from((a, b) for a, b, _ in edges if a != b)
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) >= min_sites)
