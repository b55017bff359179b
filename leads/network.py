"""network.png: the resale network of the top leads (sites as nodes, resold packs as weighted
edges, ring members highlighted), written beside the leads."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import networkx as nx  # noqa: E402


MAX_EDGES = 120  # a picture an inspector can read; the full network is in the evidence


def draw(path: str, edges: list[tuple[str, str, int]], top_sites: list[str], rings: list[list[str]]) -> None:
    ring_of = {s: n for n, r in enumerate(rings) for s in r}
    top = set(top_sites)
    # Edges into the top buyer sites first, then ring edges, heaviest first.
    ranked = sorted(((0 if b in top else 1, -p, a, b, p) for a, b, p in edges
                     if a != b and (b in top or ring_of.get(a, -1) == ring_of.get(b, -2))))
    g = nx.DiGraph()
    for *_, a, b, packs in ranked[:MAX_EDGES]:
        g.add_edge(a, b, weight=packs)
    fig, ax = plt.subplots(figsize=(11, 8), dpi=110)
    ax.set_title(f"Resale network: top {len(top_sites)} buyer sites, {len(rings)} ring(s) "
                 "(edge: first dispense -> resale, width: packs)")
    ax.axis("off")
    if g.number_of_nodes():
        pos = nx.spring_layout(g, seed=7, k=1.2 / max(g.number_of_nodes(), 1) ** 0.5)
        colours = ["tab:red" if n in ring_of else ("tab:orange" if n in top else "lightgrey") for n in g]
        widths = [0.6 + 2.5 * d["weight"] / max(w for *_, w in g.edges(data="weight")) for *_, d in g.edges(data=True)]
        nx.draw_networkx_nodes(g, pos, node_color=colours, node_size=260, ax=ax)
        nx.draw_networkx_edges(g, pos, width=widths, arrows=True, arrowsize=10, alpha=0.7, ax=ax,
                               edge_color=["tab:red" if ring_of.get(a, -1) == ring_of.get(b, -2) else "grey"
                                           for a, b in g.edges()])
        nx.draw_networkx_labels(g, pos, font_size=7, ax=ax)
        nx.draw_networkx_edge_labels(g, pos, edge_labels={(a, b): w for a, b, w in g.edges(data="weight")},
                                     font_size=6, ax=ax)
    else:
        ax.text(0.5, 0.5, "no resold packs", ha="center", va="center")
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
