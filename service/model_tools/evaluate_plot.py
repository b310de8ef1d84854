"""The PNGs of `befund model evaluate`: ROC, reliability diagram, confusion matrix and
subgroups of one model; and for `--compare`, each study's probability under both models with
the studies that flip marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.model_tools.node_results import Outcome
from service.model_tools.provenance import needs_matplotlib
from service.model_tools.study_set import Study


def plot_evaluation(f: dict[str, Any], model: str, path: Path) -> None:
    plt = needs_matplotlib()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.8, 1.6]})
    roc, auc = f.get("roc_curve"), f.get("roc_auc")
    ax = axes[0]
    if roc:
        ax.step(roc["fpr"], roc["tpr"], where="post", color="tab:blue")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.set_title("ROC" + (f": AUC {auc['value']:.3f} ({auc['ci95'][0]:.3f}-{auc['ci95'][1]:.3f})"
                          if auc else ": one class only"), fontsize=9)

    ax = axes[1]
    cal = f["calibration"]
    for b in cal["bins"]:
        ax.bar((b["bin"][0] + b["bin"][1]) / 2, b["observed_rate"], width=b["bin"][1] - b["bin"][0],
               edgecolor="tab:blue", color="tab:blue", alpha=0.35)
        ax.plot(b["mean_probability"], b["observed_rate"], "o", color="tab:blue")
        ax.annotate(str(b["n"]), (b["mean_probability"], b["observed_rate"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="stated probability of the finding", ylabel="observed rate", xlim=(0, 1),
           ylim=(-0.02, 1.02))
    ax.set_title(f"reliability: ECE {cal['ece']} ({cal['n']} studies; n per bin)", fontsize=9)

    ax = axes[2]
    c = f["confusion"]
    grid = [[c["tp"], c["fn"]], [c["fp"], c["tn"]]]
    ax.imshow(grid, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(grid[i][j]), ha="center", va="center", fontsize=14)
    ax.set_xticks([0, 1], ["flagged", "not flagged"])
    ax.set_yticks([0, 1], ["finding", "no finding"])
    sens, spec = f["sensitivity"], f["specificity"]
    ax.set_title(f"{f['analysed']} of {f['studies']} analysed; sens "
                 f"{sens['value'] if sens else 'n/a'}, spec {spec['value'] if spec else 'n/a'}", fontsize=9)

    ax = axes[3]
    names, values, lows, highs, colors = [], [], [], [], []
    for key, groups in f["subgroups"].items():
        for value, g in groups.items():
            for what, color in (("sensitivity", "tab:red"), ("specificity", "tab:green")):
                if g[what] is not None:
                    names.append(f"{key}={value} {what[:4]} (n={g[what]['n']})")
                    values.append(g[what]["value"])
                    lows.append(g[what]["value"] - g[what]["ci95"][0])
                    highs.append(g[what]["ci95"][1] - g[what]["value"])
                    colors.append(color)
    if names:
        ys = range(len(names))
        ax.barh(ys, values, xerr=[lows, highs], color=colors, alpha=0.6, capsize=2)
        ax.set_yticks(list(ys), names, fontsize=6)
        ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_title("subgroups (Wilson 95 % intervals)", fontsize=9)
    fig.suptitle(f"befund model evaluate {model}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compare(studies: list[Study], a: dict[str, Outcome], b: dict[str, Outcome], key_a: str,
                 key_b: str, path: Path) -> None:
    plt = needs_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for s in studies:
        pa, pb = a[s.uid].probability, b[s.uid].probability
        if pa is None or pb is None:
            continue
        flip = a[s.uid].present != b[s.uid].present
        ax.scatter(pa, pb, marker="o" if s.label else "x", s=60 if flip else 25,
                   color="tab:red" if flip else ("tab:blue" if s.label else "tab:grey"))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel=f"P(finding), {key_a}", ylabel=f"P(finding), {key_b}", xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.02))
    ax.set_title("each study (o: finding, x: none; red: verdict flips)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
