"""network.png: the resale network of the top leads (sites as nodes, resold packs as weighted
edges, ring members highlighted), written beside the leads.

Drawn in a process of its own (`start`, then `Drawing.wait`), while the run writes its other
outputs: matplotlib's import and the rendering are about a second of one core that the run no
longer waits for, and the run's own process never imports matplotlib."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

MAX_EDGES = 120  # a picture an inspector can read; the full network is in the evidence


@dataclass
class Drawing:
    """A network.png being drawn by its own process."""
    proc: subprocess.Popen
    spec: str

    def wait(self) -> None:
        """Wait for the picture; a failure is the run's failure (an output not written: OSError,
        which the command line reports in one line), with the drawing's own last words."""
        _, err = self.proc.communicate()
        os.unlink(self.spec)
        if self.proc.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {self.proc.returncode}"]
            raise OSError(f"network.png: the drawing failed: {last[0][:500]}")


def drawable(edges: list[tuple[str, str, int]], top_sites: list[str],
             rings: list[list[str]]) -> list[tuple[str, str, int]]:
    """The edges the picture can show: into a top buyer site, or within a ring (not a loop)."""
    ring_of = {s: n for n, r in enumerate(rings) for s in r}
    top = set(top_sites)
    return [(a, b, p) for a, b, p in edges if a != b and (b in top or ring_of.get(a, -1) == ring_of.get(b, -2))]


def start(path: str, edges: list[tuple[str, str, int]], top_sites: list[str], rings: list[list[str]]) -> Drawing:
    """Begin drawing path from the run's resale edges, its top buyer sites and its rings. Only
    the drawable edges go to the drawing process: a national run has hundreds of thousands of
    edges (10M lines: 513,000, 1.4 s of JSON here), of which the picture shows 120."""
    spec = path + ".json.tmp"
    with open(spec, "w", encoding="utf-8") as fh:
        json.dump({"edges": drawable(edges, top_sites, rings), "top": top_sites, "rings": rings}, fh)
    proc = subprocess.Popen([sys.executable, "-m", "tracecode.leads.network", spec, path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return Drawing(proc, spec)


def draw(path: str, edges: list[tuple[str, str, int]], top_sites: list[str], rings: list[list[str]]) -> None:
    import networkx as nx
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ring_of = {s: n for n, r in enumerate(rings) for s in r}
    top = set(top_sites)
    # Edges into the top buyer sites first, then ring edges, heaviest first.
    ranked = sorted((0 if b in top else 1, -p, a, b, p) for a, b, p in drawable(edges, top_sites, rings))
    g = nx.DiGraph()
    for *_, a, b, packs in ranked[:MAX_EDGES]:
        g.add_edge(a, b, weight=packs)
    fig = Figure(figsize=(11, 8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
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
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", metadata={"Software": None})
    os.replace(tmp, path)


if __name__ == "__main__":
    spec_path, png_path = sys.argv[1:3]
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    draw(png_path, [tuple(e) for e in spec["edges"]], spec["top"], spec["rings"])
