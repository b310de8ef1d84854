"""The PNG of `befund model check`: one row per check, green or red, and smoke timings."""

from __future__ import annotations

from pathlib import Path

from service.model_tools.card_check import CheckReport
from service.model_tools.provenance import needs_matplotlib


def plot_check(report: CheckReport, path: Path) -> None:
    plt = needs_matplotlib()
    rows = report.checks
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.0))
    ax.set_axis_off()
    title = report.card.key if report.card else str(report.folder)
    ax.set_title(f"befund model check {title}: {'passed' if report.ok else 'FAILED'}", loc="left",
                 fontsize=10, color="black" if report.ok else "tab:red")
    for i, c in enumerate(rows):
        y = 1.0 - (i + 0.5) / len(rows)
        ax.text(0.0, y, "ok" if c.ok else "FAIL", color="tab:green" if c.ok else "tab:red",
                fontsize=8, family="monospace", weight="bold", transform=ax.transAxes, va="center")
        detail = c.detail if len(c.detail) < 130 else c.detail[:127] + "..."
        ax.text(0.06, y, f"{c.name}: {detail}", fontsize=8, family="monospace",
                transform=ax.transAxes, va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
