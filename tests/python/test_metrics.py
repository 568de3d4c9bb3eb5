"""The admin listener's /metrics, read the way Prometheus and Grafana read it.

A scrape of a real wshd, with traffic on it, goes through prometheus_client's
OpenMetrics parser (strict: one malformed line, a histogram without a
`+Inf` bucket or a bad `le` rejects the whole scrape, as Prometheus would).
Then every query on the shipped Grafana dashboard (docs/grafana-dashboard.json)
is checked against the parsed families: each series selector must match a
sample the scrape has, and each `histogram_quantile` must give a number, not
NaN, from the buckets it selects (NaN is what Prometheus returns without a
`+Inf` bucket, and what left the latency panels empty in #23).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from websockets.asyncio.client import connect as ws_connect

from conftest import REPO_ROOT, _from_root, _stop, launch_wshd

DASHBOARD = REPO_ROOT / "docs" / "grafana-dashboard.json"


def _admin_addr(log_path: Path) -> tuple[str, int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"admin listener:.*?addr=([0-9.]+):(\d+)", log_path.read_text(errors="replace"))
        if m:
            return m.group(1), int(m.group(2))
        time.sleep(0.02)
    pytest.fail(f"no admin listener line in the log:\n{log_path.read_text(errors='replace')}", pytrace=False)


@pytest.fixture(scope="module")
def wshd_admin():
    target_dir = _from_root(os.environ.get("WSHD_TARGET_DIR", "target/debug"))
    tmp = Path(tempfile.mkdtemp(prefix="wshd-py-metrics-"))
    proc = None
    try:
        handlers = tmp / "handlers"
        handlers.mkdir()
        shutil.copy2(target_dir / "libecho_wsh.so", handlers / "libecho_wsh.so")
        proc, host, port, log_path = launch_wshd(tmp, handlers, "--admin", "127.0.0.1:0")
        yield {"ws": f"ws://{host}:{port}", "admin": _admin_addr(log_path)}
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _scrape(admin: tuple[str, int]) -> str:
    conn = http.client.HTTPConnection(*admin, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    assert resp.status == 200, body
    return body


async def _traffic(base: str) -> None:
    """Echoes, so every per-route family (and the on_message histogram)
    has samples, then a close, so the close counter does."""
    async with ws_connect(base + "/echo", ping_interval=None) as ws:
        for i in range(20):
            await ws.send(f"m{i}")
            assert await asyncio.wait_for(ws.recv(), 10) == f"m{i}"


def _selectors(expr: str):
    """The series selectors of a PromQL expression: (name, [(label, op, value)]).
    Grafana variables are widened: `$route` matches anything."""
    out = []
    for m in re.finditer(r"\b(wshd_[a-z_]+)\s*(\{([^}]*)\})?", expr):
        matchers = []
        for lm in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', m.group(3) or ""):
            label, op, value = lm.groups()
            matchers.append((label, op, re.sub(r"\$\w+", ".*", value)))
        out.append((m.group(1), matchers))
    return out


def _matches(labels: dict, matchers) -> bool:
    for label, op, value in matchers:
        have = labels.get(label, "")
        ok = {
            "=": have == value,
            "!=": have != value,
            "=~": re.fullmatch(value, have) is not None,
            "!~": re.fullmatch(value, have) is None,
        }[op]
        if not ok:
            return False
    return True


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over cumulative (le, count) pairs:
    NaN without a +Inf bucket or with no observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][0] != math.inf:
        return math.nan
    total = buckets[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == math.inf:
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_le, prev_count = le, count
    return math.nan


def test_a_real_scrape_is_valid_openmetrics_and_feeds_every_dashboard_panel(wshd_admin):
    asyncio.run(_traffic(wshd_admin["ws"]))
    # The close is counted once the server has seen it: scrape until then.
    deadline = time.monotonic() + 20
    while True:
        text = _scrape(wshd_admin["admin"])
        families = list(text_string_to_metric_families(text))  # raises on invalid OpenMetrics
        samples = [s for f in families for s in f.samples]
        closed = [s for s in samples if s.name == "wshd_closes_total"]
        if closed or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    # Every histogram ends in a +Inf bucket (the parser checks it too).
    hist = [f for f in families if f.type == "histogram"]
    assert hist, "no histogram family in the scrape"
    for f in hist:
        les = [s.labels["le"] for s in f.samples if s.name.endswith("_bucket")]
        assert "+Inf" in les, f"{f.name} has no +Inf bucket: {les[-3:]}"
        assert not any("e308" in le for le in les), les

    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if "expr" in t]
    assert len(exprs) >= 8, exprs
    for expr in exprs:
        sels = _selectors(expr)
        assert sels, f"no wshd series in {expr!r}"
        for name, matchers in sels:
            hits = [s for s in samples if s.name == name and _matches(s.labels, matchers)]
            assert hits, f"panel query {expr!r}: no sample of {name} matches {matchers}"
            m = re.match(r"histogram_quantile\(([0-9.]+),\s*sum by \(([^)]*)\)", expr)
            if m:
                q = float(m.group(1))
                by = [g.strip() for g in m.group(2).split(",") if g.strip() != "le"]
                groups: dict[tuple, dict[float, float]] = {}
                for s in hits:
                    key = tuple(s.labels.get(b, "") for b in by)
                    le = math.inf if s.labels["le"] == "+Inf" else float(s.labels["le"])
                    groups.setdefault(key, {}).setdefault(le, 0.0)
                    groups[key][le] += s.value
                results = {k: _quantile(q, list(v.items())) for k, v in groups.items()}
                assert any(not math.isnan(v) for v in results.values()), f"{expr!r} gives NaN: {results}"
                for v in results.values():
                    if not math.isnan(v):
                        assert 0 <= v < 60, f"{expr!r}: {v}"
