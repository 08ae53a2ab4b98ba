"""deploy/: the Grafana dashboard only queries metrics that NodeMetrics exports, and the Prometheus,
Grafana provisioning and docker-compose files agree with each other (no network, no containers)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from swarm.coordinator.routing import SwarmMap
from swarm.node.metrics import NodeMetrics
from swarm.serve.status import StatusBoard, summarize

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "swarm-node.json"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
TARGETS_DIR = DEPLOY / "prometheus" / "targets"
COMPOSE = DEPLOY / "docker-compose.yml"
DATASOURCES_YML = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARDS_YML = DEPLOY / "grafana" / "provisioning" / "dashboards" / "swarm.yml"

# Sample names prometheus_client exports for each metric type, relative to the family name
# (a counter family is named without `_total`; an Info "x" is the family "x" with the sample "x_info").
SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
    "info": ("_info",),
}
# Words of PromQL that look like metric names but are operators or modifiers.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# An identifier not followed by "(" (that would be a function or aggregation).
IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*$")


def exposed_names(metrics: NodeMetrics) -> set[str]:
    """Every sample name the registry exports now or once its labelled series exist."""
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def swarm_gauge_names() -> set[str]:
    """The swarm-wide gauges `swarm serve` / `swarm monitor` export (swarm/serve/status.py)."""
    board = StatusBoard(dht=None, models={"m": 1})  # never refreshed: its summary is set here
    board.latest["m"] = summarize(SwarmMap("m", 1, ()))
    return {sample.name for family in board.collect() for sample in family.samples}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (labels, functions and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', " ", expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors and subqueries
    text = GROUPING.sub(" ", text)  # by (rpc, le), on (instance), ...
    return {name for name in IDENTIFIER.findall(text) if name.lower() not in PROMQL_WORDS}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # panels inside collapsed rows


def panel_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def variable(dashboard: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in dashboard["templating"]["list"] if v["name"] == name]
    assert len(found) == 1, f"dashboard variable {name!r}"
    return found[0]


def load_yaml(path: Path) -> Any:
    """The parsed YAML file, or None where PyYAML is not installed (the text checks still run)."""
    try:
        import yaml
    except ImportError:
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose_mounts() -> dict[str, str]:
    """Bind mounts of docker-compose.yml: host path (relative to deploy/) -> container path."""
    mounts: dict[str, str] = {}
    for line in COMPOSE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\s*-\s*\"?(\./[^:\s]+):([^:\s\"]+)(?::ro)?\"?\s*$", line)
        if match:
            mounts[match.group(1)] = match.group(2)
    return mounts


def test_exposed_names_match_a_registry_with_every_series() -> None:
    fresh = exposed_names(NodeMetrics())
    used = NodeMetrics()
    used.observe_request("Forward", "OK", 0.01)
    used.tokens.labels(rpc="Forward").inc(4)
    used.queue_wait_seconds.labels(priority="forward").observe(0.001)
    used.set_info(version="0", model="m", device="cpu", dtype="float32", quant="none", peer_id="p")
    samples = {sample.name for family in used.registry.collect() for sample in family.samples}
    # `_created` timestamps depend on PROMETHEUS_DISABLE_CREATED_SERIES; no dashboard uses them.
    assert {name for name in fresh if not name.endswith("_created")} == {
        name for name in samples if not name.endswith("_created")
    }
    assert {
        "swarm_node_requests_total",
        "swarm_node_request_seconds_bucket",
        "swarm_node_request_seconds_count",
        "swarm_node_batch_requests_sum",
        "swarm_node_state",
        "swarm_node_info",
    } <= fresh


def test_metric_names_skip_labels_functions_and_keywords() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (rpc, le) (rate(swarm_node_request_seconds_bucket{rpc="Forward",'
        ' instance=~"$instance"}[$__rate_interval]))) or on (instance) up offset 5m'
        " / ignoring(code) group_left(le) (swarm_node_state > bool 0)"
    )
    assert metric_names(expr) == {"swarm_node_request_seconds_bucket", "up", "swarm_node_state"}


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = load_dashboard()
    exported = exposed_names(NodeMetrics()) | swarm_gauge_names()
    exprs = panel_exprs(dashboard)
    assert len(exprs) >= 20
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title!r}: no metric in {expr!r}"
        assert names <= exported, f"{title!r} queries {sorted(names - exported)} that nothing exports"
    instance = variable(dashboard, "instance")
    match = LABEL_VALUES.match(instance["definition"])
    assert match and match.group(1) in exported and match.group(2) == "instance"
    assert instance["query"]["query"] == instance["definition"]


def test_every_selector_filters_on_the_instance_variable() -> None:
    for title, expr in panel_exprs(load_dashboard()):
        selectors = re.findall(r"\b(swarm_node_\w+)(\{[^}]*\})?", expr)
        if not selectors:  # the whole swarm's gauges come from the monitor, not from a node instance
            assert metric_names(expr) <= swarm_gauge_names(), title
            continue
        for name, matchers in selectors:
            assert 'instance=~"$instance"' in matchers, f"{title!r}: {name} ignores $instance"


def test_dashboard_variables_and_datasource() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "swarm-node"
    assert 36 <= dashboard["schemaVersion"] <= 41
    ds = variable(dashboard, "DS_PROMETHEUS")
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    instance = variable(dashboard, "instance")
    assert instance["type"] == "query" and instance["multi"] and instance["includeAll"]
    panels = list(all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]


@pytest.mark.parametrize(
    "metric",
    [
        "swarm_node_state",
        "swarm_node_span_start",
        "swarm_node_span_end",
        "swarm_node_requests_total",
        "swarm_node_request_seconds_bucket",
        "swarm_node_inference_step_seconds_bucket",
        "swarm_node_tokens_total",
        "swarm_node_wire_bytes_total",
        "swarm_node_cache_used_bytes",
        "swarm_node_cache_total_bytes",
        "swarm_node_inference_sessions",
        "swarm_node_queue_depth",
        "swarm_node_queue_wait_seconds_bucket",
        "swarm_node_batch_requests_count",
        "swarm_node_throughput_tokens_per_second",
        "swarm_node_network_bytes_per_second",
        "swarm_node_dht_peers",
        "swarm_node_rebalances_total",
    ],
)
def test_dashboard_has_a_panel_for(metric: str) -> None:
    assert any(metric in metric_names(expr) for _, expr in panel_exprs(load_dashboard()))


def test_prometheus_scrapes_swarm_nodes_every_15s() -> None:
    text = PROMETHEUS_YML.read_text(encoding="utf-8")
    assert re.search(r"^\s*scrape_interval:\s*15s\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*-\s*job_name:\s*swarm-node\s*$", text, re.MULTILINE)
    # The file_sd alternative is commented out and points at the mounted targets folder.
    assert re.search(r"^\s*#\s*file_sd_configs:", text, re.MULTILINE)
    assert "/etc/prometheus/targets/*.json" in text
    assert "http_sd_configs:" not in text.replace("`http_sd_configs`", "")
    config = load_yaml(PROMETHEUS_YML)
    if config is None:
        return
    assert config["global"]["scrape_interval"] == "15s"
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "swarm-node"]
    targets = [target for group in job["static_configs"] for target in group["targets"]]
    assert targets and all(re.fullmatch(r"[\w.-]+:\d+", target) for target in targets)
    assert "file_sd_configs" not in job


def test_example_targets_file() -> None:
    files = sorted(TARGETS_DIR.glob("*.json"))
    assert files
    for path in files:
        groups = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(groups, list) and groups
        for group in groups:
            assert set(group) <= {"targets", "labels"}
            assert all(re.fullmatch(r"[\w.-]+:\d+", target) for target in group["targets"])


def test_compose_mounts_what_the_configs_reference() -> None:
    mounts = compose_mounts()
    # Prometheus reads /etc/prometheus/prometheus.yml and, for file_sd, /etc/prometheus/targets/.
    assert mounts["./prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in COMPOSE.read_text(encoding="utf-8")
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    for host_path in mounts:
        assert (DEPLOY / host_path).exists(), host_path


def test_grafana_provisioning_loads_the_dashboard_directory() -> None:
    mounts = compose_mounts()
    text = DASHBOARDS_YML.read_text(encoding="utf-8")
    match = re.search(r"^\s*path:\s*(\S+)\s*$", text, re.MULTILINE)
    assert match
    container_path = match.group(1)
    (host_path,) = [host for host, container in mounts.items() if container == container_path]
    directory = DEPLOY / host_path
    assert directory == DASHBOARD.parent and directory.is_dir()
    assert DASHBOARD in set(directory.glob("*.json"))
    provider = load_yaml(DASHBOARDS_YML)
    if provider is not None:
        (entry,) = provider["providers"]
        assert entry["type"] == "file" and entry["options"]["path"] == container_path


def test_grafana_datasource_points_at_the_compose_prometheus() -> None:
    text = DATASOURCES_YML.read_text(encoding="utf-8")
    assert re.search(r"^\s*type:\s*prometheus\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*url:\s*http://prometheus:9090\s*$", text, re.MULTILINE)
    assert re.search(r"^  prometheus:\s*$", COMPOSE.read_text(encoding="utf-8"), re.MULTILINE)
    config = load_yaml(DATASOURCES_YML)
    compose = load_yaml(COMPOSE)
    if config is None or compose is None:
        return
    (source,) = config["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert {"prometheus", "grafana"} <= set(compose["services"])
    for name, service in compose["services"].items():
        # A service built from source needs a Dockerfile that exists.
        if "build" in service:
            build = service["build"] if isinstance(service["build"], str) else service["build"]["context"]
            assert (DEPLOY / build).is_dir(), name


def test_readme_describes_every_deploy_file() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for path in (DASHBOARD, PROMETHEUS_YML, COMPOSE, DATASOURCES_YML, DASHBOARDS_YML, TARGETS_DIR):
        assert str(path.relative_to(DEPLOY.parent)) in readme, path
    assert "docker compose -f deploy/docker-compose.yml up" in readme


@pytest.mark.parametrize("metric", sorted(swarm_gauge_names()))
def test_dashboard_has_a_panel_for_swarm_gauge(metric: str) -> None:
    assert any(metric in metric_names(expr) for _, expr in panel_exprs(load_dashboard()))
