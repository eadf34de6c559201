"""Human-readable renderings of costs and pipeline reports (rich tables) and graph drawings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import fx

from graphopt.analysis.cost import GraphCost, module_summary
from graphopt.errors import GraphoptError
from graphopt.manager import PassRecord, PipelineReport

__all__ = ["human", "pass_table", "summary_table", "layer_rows", "layer_table", "print_coverage", "draw_graph"]


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip() if isinstance(n, int) or float(n).is_integer() else f"{n:.3g} {unit}".rstrip()


def _delta(a: float, b: float) -> str:
    if a == b:
        return human(a)
    pct = f" ({(b - a) / a * 100:+.1f}%)" if a else ""
    return f"{human(a)} -> {human(b)}{pct}"


def pass_table(rec: PassRecord, max_rows: int = 12) -> Table:
    ver = rec.verification.summary() if rec.verification else "-"
    t = Table(title=f"{rec.spec}  [{rec.semantics}]  {rec.time_s * 1000:.0f} ms", title_justify="left",
              show_header=True, header_style="bold")
    t.add_column("what")
    t.add_column("detail", overflow="fold")
    t.add_row("changed", f"{len(rec.rewrites)} rewrites, {len(rec.declined)} declined" if rec.modified or rec.declined
              else "nothing to do")
    t.add_row("verification", ver)
    t.add_row("MACs", _delta(rec.before["macs"], rec.after["macs"]))
    t.add_row("params", _delta(rec.before["params"], rec.after["params"]))
    if rec.before["trainable_params"] != rec.after["trainable_params"]:
        t.add_row("trainable", _delta(rec.before["trainable_params"], rec.after["trainable_params"]))
    t.add_row("nodes", _delta(rec.before["nodes"], rec.after["nodes"]))
    for r in rec.rewrites[:max_rows]:
        t.add_row(f"[green]+[/] {r['target']}", r["detail"])
    if len(rec.rewrites) > max_rows:
        t.add_row("", f"... {len(rec.rewrites) - max_rows} more rewrites (see the manifest / --report)")
    for d in rec.declined[:max_rows]:
        t.add_row(f"[yellow]-[/] {d['target']}", d["reason"])
    if len(rec.declined) > max_rows:
        t.add_row("", f"... {len(rec.declined) - max_rows} more declined")
    return t


def summary_table(report: PipelineReport) -> Table:
    t = Table(title="pipeline", title_justify="left", header_style="bold")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    b, a = report.before, report.after
    for label, x, y in (("MACs (fwd)", b.macs, a.macs), ("params", b.params, a.params),
                        ("trainable params", b.trainable_params, a.trainable_params),
                        ("activation bytes", b.activation_bytes, a.activation_bytes), ("nodes", b.nodes, a.nodes)):
        t.add_row(label, human(x), human(y))
    return t


def layer_rows(gm: fx.GraphModule) -> list[dict[str, Any]]:
    rows = []
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        cost = node.meta.get("cost")
        rows.append({
            "name": node.name, "op": node.op, "target": str(node.target), "kind": module_summary(gm, node),
            "shape": list(tm.shape) if hasattr(tm, "shape") else None,
            "dtype": str(tm.dtype).replace("torch.", "") if hasattr(tm, "dtype") else None,
            "macs": cost.macs if cost else 0, "params": cost.params if cost else 0,
            "out_bytes": cost.out_bytes if cost else 0,
        })
    return rows


def layer_table(gm: fx.GraphModule, cost: GraphCost, all_nodes: bool = False) -> Table:
    t = Table(header_style="bold", title=f"{gm.meta.get('graphopt', {}).get('source_class', '')}",
              title_justify="left")
    for col, just in (("node", "left"), ("op", "left"), ("output", "left"), ("MACs", "right"),
                      ("params", "right"), ("%MACs", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in layer_rows(gm):
        if not all_nodes and r["macs"] == 0 and r["params"] == 0 and r["op"] not in ("placeholder", "output"):
            continue
        shape = "x".join(map(str, r["shape"])) + f" {r['dtype']}" if r["shape"] else "-"
        share = f"{r['macs'] / cost.macs * 100:.1f}" if cost.macs and r["macs"] else ""
        t.add_row(r["name"], r["kind"], shape, human(r["macs"]) if r["macs"] else "", human(r["params"]) if r["params"] else "", share)
    t.add_section()
    t.add_row("total", f"{cost.nodes} nodes", "", human(cost.macs), human(cost.params), "100.0")
    return t


def print_coverage(console: Console, cost: GraphCost) -> None:
    cov = cost.coverage
    console.print(f"coverage: {cov['macs'] * 100:.1f}% of MACs, {cov['params'] * 100:.1f}% of parameters "
                  "inside the graph")
    for o in cov.get("opaque", []):
        console.print(f"  [yellow]opaque[/] {o['module']} ({o['class']}): {o['reason']}")


def draw_graph(gm: fx.GraphModule, path: str | Path) -> Path:
    """Draw the IR as a layered DAG to PNG/SVG/PDF: nodes coloured by op, sized by MACs, labelled
    with their layer (module path) or operation; skip connections (edges that jump over layers,
    e.g. residual adds) drawn as orange arcs so that they do not hide behind the main path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    from graphopt.analysis.graph import to_networkx

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise GraphoptError(f"cannot draw to '{path.suffix}'", where=str(path), fix="use a .png, .svg or .pdf file")
    g = to_networkx(gm)
    pos: dict[str, tuple[float, float]] = {}
    width = 1
    for layer, nodes in enumerate(nx.topological_generations(g)):
        width = max(width, len(nodes))
        for i, n in enumerate(sorted(nodes)):
            g.nodes[n]["layer"] = layer
            pos[n] = (i - (len(nodes) - 1) / 2, -float(layer))  # one row per topological layer, centred
    depth = max(nx.get_node_attributes(g, "layer").values(), default=0) + 1
    colors = {"placeholder": "#4caf50", "output": "#f44336", "call_module": "#2196f3",
              "call_function": "#ff9800", "call_method": "#9c27b0", "get_attr": "#9e9e9e"}
    max_macs = max((d["macs"] for _, d in g.nodes(data=True)), default=1) or 1
    sizes = [40 + 400 * (d["macs"] / max_macs) for _, d in g.nodes(data=True)]
    skips = [(u, v) for u, v in g.edges if g.nodes[v]["layer"] - g.nodes[u]["layer"] > 1]
    direct = [e for e in g.edges if e not in set(skips)]
    with plt.rc_context({"svg.fonttype": "none"}):  # labels stay searchable text in SVG
        fig, ax = plt.subplots(figsize=(10, max(6, depth * 0.32)))
        nx.draw_networkx_edges(g, pos, edgelist=direct, ax=ax, arrows=False, width=0.5, alpha=0.5)
        arcs = nx.draw_networkx_edges(g, pos, edgelist=skips, ax=ax, arrows=True, arrowstyle="-",
                                      connectionstyle="arc3,rad=0.35", edge_color="#e65100", width=1.0,
                                      nodelist=list(g.nodes), node_size=sizes)
        for i, arc in enumerate(arcs or []):
            arc.set_gid(f"skip-connection-{i}")
        nx.draw_networkx_nodes(g, pos, ax=ax, node_size=sizes,
                               node_color=[colors.get(d["op"], "#607d8b") for _, d in g.nodes(data=True)])
        if g.number_of_nodes() <= 150:
            labels = {n: (f"{d['target']} ({d['kind']})" if d["op"] == "call_module" else
                          n if d["op"] in ("placeholder", "output") else d["kind"]) for n, d in g.nodes(data=True)}
            nx.draw_networkx_labels(g, pos, ax=ax, labels=labels, font_size=5)
        for op, c in colors.items():
            ax.scatter([], [], c=c, label=op)
        ax.plot([], [], color="#e65100", label="skip connection")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
        half = max(1.5, width / 2 + 0.5)
        ax.set_xlim(-half, half)
        model = str(gm.meta.get("graphopt", {}).get("source_class", "graph")).rsplit(".", 1)[-1]
        title = f"{model}: {g.number_of_nodes()} nodes, {len(skips)} skip connection(s) (node size ~ MACs)"
        ax.set_title(title)
        ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=120, metadata={"Title": title})
        plt.close(fig)
    return path
