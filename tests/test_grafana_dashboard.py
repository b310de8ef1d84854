"""docs/grafana/befund.json: a Grafana dashboard that reads only metrics the node exports, and
every one of them (service/metrics.py), so a renamed metric cannot leave a panel empty."""

from __future__ import annotations

import json
import re

from prometheus_client import Counter, Gauge, Histogram

from service import metrics
from tests.node_harness import PROJECT

DASHBOARD = PROJECT / "docs" / "grafana" / "befund.json"


def exported_series() -> dict[str, set[str]]:
    """metric family -> the series names Prometheus scrapes for it."""
    out = {}
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            out[value._name] = {value._name + "_total"}  # noqa: SLF001 - prometheus_client's name
        elif isinstance(value, Histogram):
            out[value._name] = {value._name + s for s in ("_bucket", "_sum", "_count")}  # noqa: SLF001
        elif isinstance(value, Gauge):
            out[value._name] = {value._name}  # noqa: SLF001
    return out


def test_the_dashboard_queries_exported_metrics_and_shows_each_of_them():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bbefund_[a-z_]+\b", e)}
    families = exported_series()
    known = set().union(*families.values())
    assert used <= known, f"panels read metrics the node does not export: {sorted(used - known)}"
    unshown = [f for f, series in families.items() if not series & used]
    assert not unshown, f"metrics no panel shows: {unshown}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert any("dead" in e for e in exprs)  # the dead letters an admin must see
