"""The alert rules and the ServiceMonitor in infra/ name only what a real node exports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.serve_process import serve_process

K8S = Path(__file__).resolve().parent.parent / "infra" / "k8s"
_METRIC = re.compile(r"\b(weightcache_[a-z0-9_]+)")


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _rules() -> list[dict[str, Any]]:
    (rule_doc,) = _docs("prometheus-rules.yaml")
    assert rule_doc["kind"] == "PrometheusRule"
    return [rule for group in rule_doc["spec"]["groups"] for rule in group["rules"]]


def _exported(text: str) -> set[str]:
    """Every metric name in a scrape: from samples, and from ``# TYPE`` lines (a labelled
    counter nothing has moved yet has no sample, but it is exported)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_metric_an_alert_uses_is_exported(tmp_path: Path) -> None:
    with serve_process(tmp_path, workers=1) as node, node.client() as client:
        exported = _exported(client.get("/metrics").text)
    rules = _rules()
    assert {r["alert"] for r in rules} >= {
        "WeightcacheDiskNearlyFull", "WeightcacheWarmFailures", "WeightcacheIntegrityFailures",
        "WeightcacheDataPlaneDown", "WeightcacheNodeDown", "WeightcacheDiskFull",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        assert rule["annotations"]["summary"], rule
        assert rule["annotations"]["description"], rule
        for metric in _METRIC.findall(rule["expr"]):
            assert metric in exported, f"{rule['alert']}: {metric} is not exported"


def test_the_service_monitor_scrapes_each_node_once() -> None:
    (monitor,) = _docs("servicemonitor.yaml")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        d for d in _docs("cache-node-service.yaml")
        if d["kind"] == "Service" and selector.items() <= d["metadata"]["labels"].items()
    ]
    assert len(services) == 1, "one Service (the headless one) so each node is one target"
    (service,) = services
    assert service["spec"].get("clusterIP") == "None"
    ports = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in ports
    assert endpoint["path"] == "/metrics"
    # the node-down alert watches the job the monitor makes: the Service's name
    jobs = {m for r in _rules() for m in re.findall(r'job="([^"]+)"', r["expr"])}
    assert jobs == {service["metadata"]["name"]}
