"""Summaries of benchmark records: a Markdown table with ratios against full attention, and PNG plots."""

from __future__ import annotations

from statistics import mean

from ..calibration.mixed import wilson_interval

MIB = 2**20
COLUMNS_NOTE = (
    "Means over the runs of each row. ÷ full: the method's figure divided by full attention's at the same "
    "length (below 1 is better). Peak MiB: memory a call held at its peak above what the process held "
    "before it. Needles kept: share of needle sentences that selection kept whole. Accuracy: share of "
    "expected answers found verbatim in the output."
)


def summarize(records: list[dict], breakdown: str | None = None) -> list[dict]:
    """One row per (length, method), in length order, with means over the runs and ratios against the full
    attention row of the same length (None without one). With `breakdown` (a record label such as "task"), each
    row also holds the accuracy per value of that label."""
    groups: dict[tuple, list[dict]] = {}
    for record in sorted(records, key=lambda r: r["length"]):
        groups.setdefault((record["length"], record["method"]), []).append(record)
    rows = []
    for (length, method), group in groups.items():
        row = {
            "length": length,
            "method": method,
            "runs": len(group),
            "prompt_tokens": _mean(group, "prompt_tokens"),
            "kept_tokens": _mean(group, "kept_tokens"),
            "prefill_seconds": _mean(group, "prefill_seconds"),
            "predicted_prefill_ratio": _mean(group, "predicted_prefill_ratio"),
            "kv_cache_mib": _mean(group, "kv_cache_bytes") / MIB,
            "decode_tokens_per_second": _mean(group, "decode_tokens_per_second"),
            "peak_memory_mib": None if (peak := _mean(group, "peak_memory_bytes")) is None else peak / MIB,
            "needles_kept": _mean(group, "needles_kept"),
            "accuracy": _mean(group, "score"),
        }
        if breakdown:
            values = dict.fromkeys(r[breakdown] for r in group)
            row[f"accuracy_by_{breakdown}"] = {
                value: _mean([r for r in group if r[breakdown] == value], "score") for value in values
            }
        rows.append(row)
    full_rows = {row["length"]: row for row in rows if row["method"] == "full"}
    for row in rows:
        full = full_rows.get(row["length"])
        for field, ratio in (
            ("prefill_seconds", "prefill_ratio"),
            ("kv_cache_mib", "kv_ratio"),
            ("peak_memory_mib", "peak_memory_ratio"),
        ):
            row[ratio] = None if full is None or not full[field] or row[field] is None else row[field] / full[field]
    return rows


def _mean(records: list[dict], field: str) -> float | None:
    values = [r[field] for r in records if r.get(field) is not None]  # .get: results from before a field existed
    return mean(values) if values else None


def markdown_table(rows: list[dict]) -> str:
    """The summary rows as a Markdown table; ratios are method ÷ full attention (below 1 is better)."""
    breakdown = next((key for key in rows[0] if key.startswith("accuracy_by_")), None) if rows else None
    extra = list(rows[0][breakdown]) if breakdown else []
    header = [
        "length",
        "method",
        "kept / prompt",
        "prefill s",
        "÷ full",
        "predicted",
        "KV MiB",
        "÷ full",
        "decode tok/s",
        "peak MiB",
        "÷ full",
        "needles kept",
        "accuracy",
        *extra,
    ]
    return markdown(header, [_cells(row, breakdown, extra) for row in rows])


def _cells(row: dict, breakdown: str | None, extra: list) -> list[str]:
    """One summary row's table cells; `extra` are the values of its `breakdown` label."""
    return [
        str(row["length"]),
        row["method"],
        f"{row['kept_tokens']:.0f} / {row['prompt_tokens']:.0f}",
        _fmt(row["prefill_seconds"], ".2f"),
        _fmt(row["prefill_ratio"], ".2f", "×"),
        _fmt(row["predicted_prefill_ratio"], ".2f", "×"),
        _fmt(row["kv_cache_mib"], ".1f"),
        _fmt(row["kv_ratio"], ".2f", "×"),
        _fmt(row["decode_tokens_per_second"], ".1f"),
        _fmt(row["peak_memory_mib"], ".0f"),
        _fmt(row["peak_memory_ratio"], ".2f", "×"),
        _fmt(row["needles_kept"], ".0%"),
        _fmt(row["accuracy"], ".0%"),
        *(_fmt(row[breakdown][value], ".0%") for value in extra),
    ]


def markdown(header: list[str], rows) -> str:
    """A Markdown table: the `header` line, its rule, and a `table_line` per row of cells."""
    return "\n".join([table_line(header), "|" + "---|" * len(header), *map(table_line, rows)])


def table_line(cells) -> str:
    """One Markdown table line of `cells` (each as `str`)."""
    return "| " + " | ".join(map(str, cells)) + " |"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def answer_summary(records: list[dict], by: str) -> list[dict]:
    """One row per (length, value of the record label `by`, method): answered (every expected value found) with its
    95% interval, evidence kept, answered when kept, answered where full attention answered, and prefill and KV
    ratios against full attention on the same probes."""
    key = lambda r: (r["length"], r[by], r["seed"])  # noqa: E731
    full = {key(r): r for r in records if r["method"] == "full"}
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["length"], r[by], r["method"]), []).append(r)
    rows = []
    for (length, value, method), runs in cells.items():
        base = [full.get(key(r)) for r in runs]
        answered = [r["score"] == 1 for r in runs]
        kept = [r["needles_kept"] == 1 for r in runs]
        row = {
            "length": length,
            by: value,
            "method": method,
            "prompts": len(runs),
            "answered": sum(answered),
            "interval": wilson_interval(sum(answered), len(runs)),
            "kept": sum(kept),
            "kept_answered": sum(a and k for a, k in zip(answered, kept)),
        }
        if all(base):
            full_answered = [b["score"] == 1 for b in base]
            row["full_answered"] = sum(full_answered)
            row["both_answered"] = sum(a and f for a, f in zip(answered, full_answered))
            row["prefill_ratio"] = sum(r["prefill_seconds"] for r in runs) / sum(b["prefill_seconds"] for b in base)
            row["kv_ratio"] = sum(r["kv_cache_bytes"] for r in runs) / sum(b["kv_cache_bytes"] for b in base)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["length"], r[by], r["method"] != "full", r["method"]))


def answer_table(rows: list[dict], by: str) -> str:
    """The `answer_summary` rows as a Markdown table."""
    header = [
        "length",
        by,
        "method",
        "answered",
        "95% interval",
        "evidence kept",
        "answered when kept",
        "answered where full did",
        "prefill ÷ full",
        "KV ÷ full",
    ]
    lines = []
    for r in rows:
        low, high = r["interval"]
        lines.append(
            [
                str(r["length"]),
                str(r[by]),
                r["method"],
                f"{r['answered']}/{r['prompts']}",
                f"{low:.2f}–{high:.2f}",
                f"{r['kept']}/{r['prompts']}",
                f"{r['kept_answered']}/{r['kept']}",
                f"{r['both_answered']}/{r['full_answered']}" if "both_answered" in r else "–",
                _fmt(r.get("prefill_ratio"), ".2f", "×"),
                _fmt(r.get("kv_ratio"), ".2f", "×"),
            ]
        )
    return markdown(header, lines)


ANSWER_COLUMNS_NOTE = (
    "*answered*: every expected answer appears in the greedy output; *95% interval*: Wilson score interval of "
    "that share; *evidence kept*: selection kept every needle sentence whole; *answered when kept*: answered among "
    "those; *answered where full did*: answered among the probes full attention answered; ratios are sums over the "
    "cell's probes against full attention on the same probes."
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(rows: list[dict], path) -> None:
    """Prefill seconds, KV-cache MiB and (when measured) peak memory MiB against context length, one line per
    method, written as a PNG to `path`."""
    plt = _pyplot()
    panels = [("prefill_seconds", "prefill (time to first token), s"), ("kv_cache_mib", "KV cache after prefill, MiB")]
    if any(row["peak_memory_mib"] is not None for row in rows):
        panels.append(("peak_memory_mib", "peak memory above the loaded model, MiB"))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, (field, label) in zip(axes[0], panels):
        for method in methods:
            points = [(row["length"], row[field]) for row in rows if row["method"] == method and row[field] is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=method)
        axis.set_xlabel("context length, tokens")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_heatmaps(records: list[dict], row_label: str, path, title: str) -> None:
    """One accuracy heatmap per method (rows: values of `row_label` such as depth or task; columns: context length;
    cells: mean score), written as a PNG to `path`."""
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in records))
    lengths = sorted({r["length"] for r in records})
    row_values = list(dict.fromkeys(r[row_label] for r in records))
    if all(isinstance(v, (int, float)) for v in row_values):
        row_values.sort()
    panel_width = max(2.2, 0.7 * len(lengths))
    figure, axes = plt.subplots(
        1,
        len(methods),
        figsize=(1.5 + panel_width * len(methods), 1.8 + 0.45 * len(row_values)),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for axis, method in zip(axes[0], methods):
        image = _heatmap_panel(axis, [r for r in records if r["method"] == method], row_label, lengths, row_values)
        axis.set_title(method)
    axes[0][0].set_yticks(range(len(row_values)), [f"{v:.0%}" if isinstance(v, float) else str(v) for v in row_values])
    axes[0][0].set_ylabel(row_label)
    figure.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.8)
    figure.suptitle(title)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _heatmap_panel(axis, records: list[dict], row_label: str, lengths: list, row_values: list):
    """Draw one method's `records` on `axis` as a grid of mean scores, each cell labelled; return the image."""
    grid = [
        [_mean([r for r in records if r["length"] == length and r[row_label] == value], "score") for length in lengths]
        for value in row_values
    ]
    image = axis.imshow(
        [[float("nan") if v is None else v for v in line] for line in grid],
        vmin=0,
        vmax=1,
        cmap="RdYlGn",
        aspect="auto",
    )
    for y, line in enumerate(grid):
        for x, value in enumerate(line):
            if value is not None:
                # White on the saturated ends of the colour map, black on its pale middle.
                axis.text(
                    x,
                    y,
                    f"{value:.0%}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if abs(value - 0.5) > 0.3 else "black",
                )
    axis.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
    axis.set_xlabel("context tokens")
    return image
