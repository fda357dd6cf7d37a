"""The accuracy/speed frontier of a RAG calibration search, drawn as a PNG (needs matplotlib: the `bench` extra)."""

from __future__ import annotations


def plot_frontier(tried: list[dict], path, length: int, marks: dict[str, tuple[float, float]] | None = None) -> None:
    """Plot every schedule tried as a point (predicted prefill ratio at `length` tokens, share of probes whose answer
    sentence it keeps), one-stage and two-stage in two colours, with the frontier drawn as a step line.

    Args:
        tried: `search.rag_search` rows as written to its `.search.json` (schedules as settings dicts).
        path: the PNG written.
        length: the plan length whose predicted ratios are plotted.
        marks: label: (ratio, share) points to mark, such as the chosen profile's.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    key = str(length)
    for stages, colour, label in ((1, "tab:blue", "one stage"), (2, "tab:orange", "two stages")):
        points = [
            (row["predicted_prefill_ratio"][key], row["kept_share"])
            for row in tried
            if len(row["schedule"]["selection_layers"]) == stages
        ]
        if points:
            axis.scatter(*zip(*points), s=6, alpha=0.35, color=colour, label=f"{label} ({len(points)})")
    frontier, best = [], -1.0
    for ratio, share in sorted((row["predicted_prefill_ratio"][key], row["kept_share"]) for row in tried):
        if share > best:
            frontier.append((ratio, share))
            best = share
    if frontier:
        axis.step(*zip(*frontier), where="post", color="black", linewidth=1, label="frontier")
    for label, (ratio, share) in (marks or {}).items():
        axis.scatter([ratio], [share], s=60, marker="*", zorder=3)
        axis.annotate(label, (ratio, share), textcoords="offset points", xytext=(6, -12), fontsize=8)
    axis.set_xlabel(f"predicted prefill time ÷ full attention at {length} tokens (cost model)")
    axis.set_ylabel("share of RAG probes whose answer sentence is kept")
    axis.set_xlim(0, 1.02)
    axis.set_ylim(-0.02, 1.05)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
