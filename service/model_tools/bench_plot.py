"""The PNG of `befund model bench`: throughput and p95 latency per batch size and callers in
flight (raw onnxruntime solid, model service dashed), and the end-to-end stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.model_tools.provenance import needs_matplotlib


def plot_bench(report: dict[str, Any], path: Path) -> None:
    plt = needs_matplotlib()
    rows = report["model_only"]
    e2e = report.get("end_to_end") or {}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    batches = sorted({r["batch"] for r in rows})
    for j, c in enumerate(sorted({r["concurrency"] for r in rows})):
        mine = sorted((r for r in rows if r["concurrency"] == c), key=lambda r: r["batch"])
        color = plt.cm.tab10(j)
        for side, style in (("raw", "-"), ("service", "--")):
            if all(side in r for r in mine):
                axes[0].plot([r["batch"] for r in mine], [r[side]["items_per_s"] for r in mine], style,
                             marker="o", color=color, label=f"{side}, {c} in flight")
                axes[1].plot([r["batch"] for r in mine], [r[side]["p95_ms"] for r in mine], style,
                             marker="o", color=color, label=f"{side}, {c} in flight")
        for r in mine:
            if "ratio_service_to_raw" in r:
                axes[0].annotate(f"{r['ratio_service_to_raw']:.2f}",
                                 (r["batch"], r["service"]["items_per_s"]),
                                 fontsize=7, color=color, textcoords="offset points", xytext=(3, -9))
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.legend(fontsize=7)
    prov = report["provenance"]
    a = report["arithmetic"]
    flops = (f"; best {a['model_gflops']} GFLOP/s = {a['fraction_of_sgemm']:.2f} of sgemm "
             f"{a['sgemm_best_gflops']}" if a.get("flops_per_item") else "")
    axes[0].set_title(f"{report['model']} on {report['provider']}, {report['threads']} threads{flops}",
                      fontsize=8)
    axes[0].set_ylabel("items / s (service/raw ratio beside)")
    axes[1].set_ylabel("p95 latency per call, ms")
    axes[1].set_yscale("log")
    axes[1].set_title(f"{prov['cpu_model']}, {prov['cpu_cores_usable']} cores, "
                      f"onnxruntime {prov['onnxruntime_version']}", fontsize=8)
    runs = [r for r in e2e.get("runs", []) if r.get("stages_s")]
    if runs:
        stages = list(dict.fromkeys(s for r in runs for s in r["stages_s"]))
        for i, r in enumerate(runs):
            left = 0.0
            for k, s in enumerate(stages):
                w = max(0.0, r["stages_s"].get(s, 0.0))
                axes[2].barh(i, w, left=left, color=plt.cm.tab20(k), label=s if i == 0 else None)
                left += w
            if r.get("complete_to_delivered_s") is not None:
                axes[2].plot(r["complete_to_delivered_s"], i, "k|", markersize=16)
        axes[2].set_yticks(range(len(runs)), [("warm-up" if r["warmup"] else f"run {i}")
                                              for i, r in enumerate(runs)])
        axes[2].set_xlabel("s; bars: stages, |: series complete -> at PACS")
        axes[2].set_title(f"end to end: {e2e.get('study', '')}", fontsize=8)
        axes[2].legend(fontsize=6, loc="lower right")
    else:
        axes[2].set_axis_off()
        axes[2].text(0.5, 0.5, e2e.get("skipped", "end to end not run"), ha="center", fontsize=8,
                     transform=axes[2].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
