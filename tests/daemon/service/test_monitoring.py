"""Monitoring, checked with the real tools against a real daemon: promtool on the shipped scrape
config and alert rules (and the rules' unit tests), a real Prometheus server scraping the daemon
and answering /api/v1/query, and the Grafana dashboard's queries, which must name metrics the
daemon exports and evaluate (with data) on that Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.harness import (
    REPO,
    DaemonProcess,
    free_port,
    jsonl,
    metric_value,
    reloads,
    wait_for,
    write_atomic,
    write_config,
)
from tests.stages_for_tests import RELOAD_ENV

PROMETHEUS = REPO / "configs" / "prometheus"
DASHBOARD = REPO / "configs" / "grafana" / "reelflow.json"
NO_PROMETHEUS = "Debian's prometheus package is not installed (apt-get install -y prometheus)"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason=NO_PROMETHEUS)
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None, reason=NO_PROMETHEUS)

PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "max", "min", "avg", "histogram_quantile", "le", "without", "on",
    "ignoring", "and", "or", "unless", "bool", "offset", "count", "topk", "label_values",
}  # fmt: skip


# --- the daemon every test here looks at -------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A daemon that has done some work: records ok and in errors, a reload ok and one refused."""
    folder = tmp_path_factory.mktemp("monitored")
    model = folder / "model.txt"
    model.write_text("m\n")
    config = {
        "steps": [
            {"type": "Test", "name": "Tagger", "config": {"model_path": str(model), "batch_size": 4, "max_wait_ms": 5}},
            {
                "type": "Test",
                "name": "Tagger",
                "config": {"model_path": str(model), "output_key": "t2", "sleep_s": 0.05},
            },
        ],
        "daemon": {"inbox": "inbox", "outbox": "outbox", "settle_ms": 50, "metrics": {"port": 0}},
    }
    path = write_config(folder, config)
    process = DaemonProcess(path, env=RELOAD_ENV).start()
    try:
        rows = [{"id": i} for i in range(30)] + [{"id": 3}]  # the second id 3 is a DuplicateId error
        process.drop_text("first.jsonl", jsonl(rows))
        assert process.wait_for_job("first")["state"] == "done"
        config["steps"][0]["config"]["batch_size"] = 8
        write_atomic(path, yaml.safe_dump(config))
        wait_for(lambda: reloads(process) == (1, 0), 20, "a light reload", process)
        write_atomic(path, yaml.safe_dump(config) + "daemon: [oops\n")
        wait_for(lambda: reloads(process) == (1, 1), 20, "a refused reload", process)
        yield process
    finally:
        process.stop()


def exported_names(metrics_text: str) -> tuple[set[str], set[str]]:
    """(names a query may use for every family the daemon exports, names that have samples now)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    sampled: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
        sampled.update(sample.name for sample in family.samples)
    return names, sampled


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query in the dashboard, and the template variables' ones."""
    board = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            queries.append((f"${variable['name']}", variable["definition"]))
    return queries


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (or a Grafana `label_values(metric, label)`)."""
    expr = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr.strip())
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "{}", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "[]", without_labels)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", without_ranges))
    by_clauses = set(re.findall(r"(?:by|without|on|ignoring)\s*\(([^)]*)\)", without_ranges))
    labels = {label.strip() for clause in by_clauses for label in clause.split(",")}
    return {w for w in words - PROMQL_WORDS - labels if not w.startswith("__")}


# --- Grafana ------------------------------------------------------------------------------------


def test_dashboard_covers_what_the_issue_lists():
    board = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in board["panels"])
    for topic in ("throughput", "queue depth", "batch size", "latency", "errors", "jobs", "reloads", "model load"):
        assert topic in titles, f"no panel about {topic}: {titles}"
    exprs = " ".join(e for _, e in dashboard_queries())
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.95," in exprs
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["datasource"]["uid"] == "${datasource}" and p["gridPos"]["w"] > 0 for p in board["panels"])


def test_dashboard_queries_name_metrics_the_daemon_exports(daemon):
    names, _ = exported_names(daemon.metrics())
    used = set()
    for title, expr in dashboard_queries():
        found = metric_names(expr)
        assert found, f"{title}: no metric found in {expr!r}"
        assert found <= names, f"{title}: {sorted(found - names)} are not exported by the daemon ({expr})"
        used |= found
    assert {"reelflow_records_total", "reelflow_step_seconds_bucket", "reelflow_config_reloads_total"} <= used


def test_name_check_can_fail():
    names = {"reelflow_records_total"}
    assert metric_names('sum by (step) (rate(reelflow_recods_total{step=~"$step"}[5m]))') - names == {
        "reelflow_recods_total"
    }


# --- promtool -----------------------------------------------------------------------------------


@needs_promtool
def test_promtool_accepts_the_config_and_rules_and_their_unit_tests():
    for command in (
        ["check", "config", str(PROMETHEUS / "prometheus.yml")],
        ["check", "rules", str(PROMETHEUS / "reelflow.rules.yml")],
        ["test", "rules", str(PROMETHEUS / "reelflow.rules.test.yml")],
    ):
        result = subprocess.run(["promtool", *command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"
        assert "SUCCESS" in result.stdout


# --- a real Prometheus --------------------------------------------------------------------------


class Prometheus:
    def __init__(self, folder: Path, target: str):
        self.port = free_port()
        shutil.copy(PROMETHEUS / "reelflow.rules.yml", folder / "reelflow.rules.yml")
        shipped = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
        shipped["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        job = shipped["scrape_configs"][0]
        job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [target]}])
        (folder / "prometheus.yml").write_text(yaml.safe_dump(shipped))
        self.log = (folder / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.folder = folder
        wait_for(self._ready, 60, "Prometheus to start")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{(self.folder / 'prometheus.log').read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@needs_prometheus
def test_real_prometheus_scrapes_the_daemon(daemon, tmp_path: Path):
    target = daemon.state["metrics_url"].removeprefix("http://").removesuffix("/metrics")
    prometheus = Prometheus(tmp_path, target)
    try:
        wait_for(lambda: prometheus.query('up{job="reelflow"} == 1'), 30, "a successful scrape")
        # Work while Prometheus watches, so that rates and latency quantiles have data.
        daemon.drop_text("second.jsonl", jsonl([{"id": i} for i in range(40)]))
        assert daemon.wait_for_job("second")["state"] == "done"
        text = daemon.metrics()
        finished = metric_value(text, "reelflow_records_total", step="step_1_Test_Tagger", status="ok")
        assert finished == 70

        def scraped_finished() -> bool:
            result = prometheus.query('reelflow_records_total{step="step_1_Test_Tagger", status="ok"}')
            return bool(result) and float(result[0]["value"][1]) == finished

        wait_for(scraped_finished, 30, "Prometheus to see every finished record")
        errors = prometheus.query('reelflow_records_total{status="error"}')
        assert [(e["metric"]["step"], e["value"][1]) for e in errors] == [("read", "1")]
        reload_series = {
            r["metric"]["result"]: r["value"][1] for r in prometheus.query("reelflow_config_reloads_total")
        }
        assert reload_series == {"ok": "1", "error": "1"}
        assert prometheus.query('reelflow_jobs{state="done"}')[0]["value"][1] == "2"
        assert prometheus.query("sum(reelflow_model_loads_total)")[0]["value"][1] == "2"

        # Every dashboard query evaluates; those over metrics with samples return data.
        _, sampled = exported_names(daemon.metrics())
        for title, expr in dashboard_queries():
            if expr.startswith("label_values("):
                (metric,) = metric_names(expr)
                assert prometheus.api("series", **{"match[]": metric}), f"{title}: no series for {expr}"
                continue
            concrete = expr.replace("$__rate_interval", "30s").replace('"$instance"', '".*"').replace('"$step"', '".*"')
            result = prometheus.query(concrete)
            if metric_names(expr) <= sampled:
                assert result, f"{title}: no data from {concrete}"
        throughput = prometheus.query(
            'sum by (step) (rate(reelflow_records_total{status="ok", step="step_1_Test_Tagger"}[30s]))'
        )
        assert float(throughput[0]["value"][1]) > 0
        p95 = prometheus.query(
            'histogram_quantile(0.95, sum by (le, step) (rate(reelflow_step_seconds_bucket{step="step_1_Test_Tagger"}[30s])))'
        )
        assert 0.025 <= float(p95[0]["value"][1]) <= 1.0, p95  # the stage sleeps 0.05 s per batch

        # The alert rules are loaded and evaluate without errors against the live series.
        def rules_evaluated() -> list[dict]:
            groups = prometheus.api("rules")["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else []

        rules = wait_for(rules_evaluated, 30, "the alert rules to be evaluated")
        shipped = yaml.safe_load((PROMETHEUS / "reelflow.rules.yml").read_text())["groups"]
        names = sorted(rule["alert"] for group in shipped for rule in group["rules"])
        assert sorted(r["name"] for r in rules) == names and all(rule["health"] == "ok" for rule in rules), rules
        firing = {r["name"] for r in rules if r["state"] == "firing"}
        assert "ReelflowDown" not in firing
    finally:
        prometheus.stop()
