"""`befund model shadow-report NAME [--since 7d] [--out FOLDER]`: the running node's shadow
report for one model (service/shadow_report.py), printed for people (or as JSON), and written
as `shadow-report.json` and `shadow-report.png` (each pair's 2 x 2 table and flag rates) into
the report folder, as the other `befund model` commands do.

It asks the node's `GET /models/{name}/shadow-report` with the token from the node's config
or var dir, as `befund status` does, so it reads the same state DB the node writes (SQLite or
PostgreSQL) and the same rules hold (bounded `since`, UIDs only). `add_shadow_report_parser`
adds the subcommand to the `befund model` group.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def add_shadow_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `shadow-report` to a `befund model` subparsers object; returns its parser."""
    from service.cli import _Help

    p = subparsers.add_parser(
        "shadow-report", formatter_class=_Help,
        help="compare a model's shadow version with its active version on the same live series",
        description=__doc__)
    p.add_argument("name", help="the model's name, e.g. ich_ct")
    p.add_argument("--since", default="30d",
                   help="a span back from now (7d, 12h, 90m), a date (2026-12-01) or a date and "
                        "time (2026-12-01T08:00:00Z); at most 400 days back")
    p.add_argument("--config", help="the node's YAML config, for its HTTP port and token (default: "
                                     "befund.yaml in the working directory if present)")
    p.add_argument("--url", help="the node's HTTP address (default: http://127.0.0.1:<http_port>)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", help="report folder (default: model-reports/shadow-report-<name>-<UTC time>/)")
    p.set_defaults(func=cmd_shadow_report)
    return p


def cmd_shadow_report(args: argparse.Namespace) -> int:
    from service.cli import _config, _node_tls_context

    config = _config(args)
    scheme = "https" if config.http_tls.enabled else "http"
    url = (args.url or f"{scheme}://127.0.0.1:{config.http_port}").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must be an http:// or https:// address, not {url}")
    query = urllib.parse.urlencode({"since": args.since})
    target = f"{url}/models/{urllib.parse.quote(args.name, safe='')}/shadow-report?{query}"
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        target, headers={"Authorization": f"Bearer {config.stored_token()}",
                         "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60,  # noqa: S310 - checked above
                                    context=_node_tls_context(config)) as r:
            report = json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            why = json.loads(e.read()).get("error") or e.reason
        except ValueError:
            why = e.reason
        print(f"befund: {url} answered {e.code}: {why}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as e:
        print(f"befund: no answer from {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else "\n".join(report_lines(report)))
    write_report(report, args.out, url)
    return 0


def write_report(report: dict[str, Any], out: str | None, url: str) -> None:
    """shadow-report.json (the report, where it came from) and shadow-report.png."""
    from importlib.metadata import PackageNotFoundError, version

    from service.model_tools.provenance import report_folder, write_json

    folder = report_folder(out, "shadow-report", report["model"])
    try:
        befund = version("befund")
    except PackageNotFoundError:
        befund = "unknown"
    write_json(folder / "shadow-report.json", {
        "command": "shadow-report", "report": report,
        "provenance": {"node": url, "befund_version": befund,
                       "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})
    try:
        plot_report(report, folder / "shadow-report.png")
    except ValueError as exc:  # no matplotlib: the JSON still stands
        print(f"befund: {exc}; no PNG written", file=sys.stderr)
    print(f"report in {folder}", file=sys.stderr)


def plot_report(report: dict[str, Any], path: Any) -> None:
    """Per pair: the 2 x 2 table of verdicts and both versions' flag rates."""
    from service.model_tools.provenance import needs_matplotlib

    plt = needs_matplotlib()
    pairs = report["pairs"] or [None]
    fig, axes = plt.subplots(len(pairs), 2, figsize=(9, 3.2 * len(pairs)), squeeze=False)
    for (table_ax, rate_ax), pair in zip(axes, pairs, strict=True):
        if pair is None:
            table_ax.text(0.5, 0.5, report.get("notice") or "no pairs", ha="center", wrap=True)
            table_ax.axis("off")
            rate_ax.axis("off")
            continue
        t = pair["table"]
        cells = [[t["both_positive"], t["active_only"]], [t["shadow_only"], t["both_negative"]]]
        table_ax.imshow(cells, cmap="Blues", vmin=0, vmax=max(1, *cells[0], *cells[1]) * 1.6)
        for i in range(2):
            for j in range(2):
                table_ax.text(j, i, str(cells[i][j]), ha="center", va="center", fontsize=14)
        table_ax.set_xticks([0, 1], [f"shadow {pair['shadow']} +", "shadow -"])
        table_ax.set_yticks([0, 1], [f"active {pair['active']} +", "active -"])
        kappa = "undefined" if pair["kappa"] is None else f"{pair['kappa']:.3f}"
        table_ax.set_title(f"{report['model']}: agreement {_pct(pair['agreement'])}, kappa {kappa}",
                           fontsize=9)
        rates = [pair["flag_rate"]["active"] or 0.0, pair["flag_rate"]["shadow"] or 0.0]
        rate_ax.bar([f"active {pair['active']}", f"shadow {pair['shadow']}"], rates,
                    color=["tab:blue", "tab:orange"])
        rate_ax.set_ylim(0, 1)
        rate_ax.set_ylabel("flag rate")
        rate_ax.set_title(f"{pair['analysed_by_both']} series analysed by both, "
                          f"{pair['disagreements_total']} disagree", fontsize=9)
    fig.suptitle(f"{report['since']} to {report['until']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report in lines a person reads."""
    lines = [f"shadow report of {report['model']}, {report['since']} to {report['until']}"
             + (" (newest jobs only: more than the report reads)" if report.get("truncated") else "")]
    if not report["pairs"]:
        return [*lines, report.get("notice") or "no pairs"]
    for pair in report["pairs"]:
        table = pair["table"]
        kappa = "undefined" if pair["kappa"] is None else f"{pair['kappa']:.3f}"
        lines += [
            "",
            f"active {pair['active']} vs shadow {pair['shadow']}",
            f"  seen by both       {pair['studies_seen_by_both']} studies, "
            f"{pair['series_seen_by_both']} series ({pair['analysed_by_both']} analysed by both, "
            f"{pair['analysed_by_one_only']} by one only)",
            f"  agreement          {_pct(pair['agreement'])}   Cohen's kappa {kappa}"
            + (f" ({pair['kappa_note']})" if pair.get("kappa_note") else ""),
            f"  flag rate          active {_pct(pair['flag_rate']['active'])}, "
            f"shadow {_pct(pair['flag_rate']['shadow'])}",
            f"  both positive {table['both_positive']}, active only {table['active_only']}, "
            f"shadow only {table['shadow_only']}, both negative {table['both_negative']}",
            f"  disagreements      {pair['disagreements_total']}"
            + (f" (the newest {len(pair['disagreements'])} listed)"
               if len(pair["disagreements"]) < pair["disagreements_total"] else ""),
        ]
        for d in pair["disagreements"]:
            lines.append(f"    study {d['study_uid']} series {d['series_uid']}: "
                         f"active {_verdict(d['active'])}, shadow {_verdict(d['shadow'])}")
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _verdict(side: dict[str, Any]) -> str:
    word = {True: "positive", False: "negative"}.get(side["present"], "not analysed")
    if side.get("score") is None:
        return word
    threshold = "" if side.get("threshold") is None else f" at {side['threshold']:g}"
    return f"{word} (score {side['score']:.3f}{threshold})"
