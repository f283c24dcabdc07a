"""The Kubernetes package and the image, checked without a cluster or a Docker engine.

`kubectl kustomize` renders the base and every overlay; kubernetes-validate --strict checks every built-in
object against the API's schema; the monitoring.coreos.com objects (no bundled schema) are checked field by
field; the gateway's settings (ConfigMap + env + args) load with `onnxgate serve`'s own loader and agree
with the ports, probes, volumes and grace period; promtool checks and unit-tests the alert rules; hadolint
lints the Dockerfile; the Grafana dashboard's queries parse and name only metrics onnxgate exports.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
PACKAGES = ("base", "overlays/dev", "overlays/prod")
ALERTS = K8S / "base" / "alerts"
DASHBOARD = K8S / "base" / "grafana" / "onnxgate-dashboard.json"
BIN = Path(sys.executable).parent
# kubernetes-validate bundles 1.25-1.37: a current release, and the newest it knows
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")
MONITORING = "monitoring.coreos.com/v1"
UID = 10001

Doc = dict[str, Any]


def _tool(name: str, installer: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(BIN))
    if found is None:
        pytest.fail(f"{name} is missing: {installer} installs it")
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    kubectl = _tool("kubectl", ".ci/deps/k8s.sh")
    out = {}
    for package in PACKAGES:
        run = subprocess.run([kubectl, "kustomize", str(K8S / package)], capture_output=True, text=True)
        assert run.returncode == 0, f"kubectl kustomize k8s/{package}: {run.stderr}"
        out[package] = [d for d in yaml.safe_load_all(run.stdout) if d]
    return out


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def _maybe(docs: list[Doc], kind: str, name: str) -> Doc | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def _pod_specs(docs: list[Doc]) -> dict[str, Doc]:
    specs = {}
    for d in docs:
        if d["kind"] == "Deployment":
            specs[d["metadata"]["name"]] = d["spec"]["template"]
        elif d["kind"] == "CronJob":
            specs[d["metadata"]["name"]] = d["spec"]["jobTemplate"]["spec"]["template"]
    return specs


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _gateway(docs: list[Doc]) -> tuple[Doc, Doc]:
    deployment = _one(docs, "Deployment", "onnxgate")
    return deployment, deployment["spec"]["template"]["spec"]["containers"][0]


def _gateway_settings(docs: list[Doc]) -> Any:
    """The gateway's settings as `onnxgate serve` loads them in the pod: the envFrom ConfigMaps, then the
    container's env (the downward API's values stand in as a pod name), then the args as flags."""
    from onnxgate.server.config import load_settings

    _, container = _gateway(docs)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", "onnxgate-5d8f7c9b4-x2x7q")
    command, *args = container["args"]
    assert command == "serve"
    assert len(args) % 2 == 0, args
    flags = {args[i].removeprefix("--").replace("-", "_"): args[i + 1] for i in range(0, len(args), 2)}
    return load_settings(env=env, flags=flags)


# --- every object is valid -------------------------------------------------------------------------------


def test_every_package_renders_the_whole_deployment(rendered: dict[str, list[Doc]]) -> None:
    for package, docs in rendered.items():
        kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
        expected = {
            ("Deployment", "onnxgate"),
            ("Service", "onnxgate"),
            ("Service", "onnxgate-headless"),
            ("PodDisruptionBudget", "onnxgate"),
            ("PersistentVolumeClaim", "onnxgate-models"),
            ("PersistentVolumeClaim", "onnxgate-predlog"),
            ("Deployment", "onnxgate-learn"),
            ("CronJob", "onnxgate-retrain"),
            ("ServiceMonitor", "onnxgate"),
            ("PodMonitor", "onnxgate-learn"),
            ("PrometheusRule", "onnxgate"),
            ("ConfigMap", "onnxgate-dashboard"),
        }
        assert expected <= kinds, f"k8s/{package} lacks {expected - kinds}"
        assert any(k == "ConfigMap" and n.startswith("onnxgate-config-") for k, n in kinds), package
        assert (("HorizontalPodAutoscaler", "onnxgate") in kinds) == (package != "overlays/dev"), package


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("package", PACKAGES)
def test_strict_schema_validation(rendered: dict[str, list[Doc]], package: str, version: str, tmp_path: Path) -> None:
    """Every built-in object against Kubernetes' own schema, unknown fields refused; the CRDs' objects
    (no bundled schema) are checked by test_prometheus_operator_objects."""
    builtin = [d for d in rendered[package] if d["apiVersion"] != MONITORING]
    built = tmp_path / "built.yaml"
    built.write_text(yaml.safe_dump_all(builtin))
    run = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", version, str(built)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_prometheus_operator_objects(rendered: dict[str, list[Doc]]) -> None:
    """ServiceMonitor, PodMonitor and PrometheusRule: the fields the operator requires, no misspelt ones
    among those used, and ports that name real ports of the objects they select."""
    service_monitor = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels"}
    endpoint = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings"}
    pod_monitor = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
    rule = {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
    for package, docs in rendered.items():
        for d in (d for d in docs if d["apiVersion"] == MONITORING):
            assert set(d) <= {"apiVersion", "kind", "metadata", "spec"} and d["metadata"]["name"], d
        monitor = _one(docs, "ServiceMonitor", "onnxgate")
        assert set(monitor["spec"]) <= service_monitor, package
        selected = [
            s
            for s in docs
            if s["kind"] == "Service" and _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        # one Service: a second one selecting the same pods would have every gateway scraped twice
        assert [s["metadata"]["name"] for s in selected] == ["onnxgate"], package
        ports = {p["name"]: p for p in selected[0]["spec"]["ports"]}
        for e in monitor["spec"]["endpoints"]:
            assert set(e) <= endpoint, e
            assert e["port"] in ports, f"ServiceMonitor port {e['port']!r} is not a port of Service onnxgate"
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]

        learn = _one(docs, "PodMonitor", "onnxgate-learn")
        assert set(learn["spec"]) <= pod_monitor, package
        pods = [
            t
            for t in _pod_specs(docs).values()
            if _selects(learn["spec"]["selector"]["matchLabels"], t["metadata"]["labels"])
        ]
        assert len(pods) == 1, package
        container_ports = {p["name"] for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
        for e in learn["spec"]["podMetricsEndpoints"]:
            assert set(e) <= endpoint and e["port"] in container_ports, e

        rules = _one(docs, "PrometheusRule", "onnxgate")
        assert set(rules["spec"]) == {"groups"}
        for group in rules["spec"]["groups"]:
            assert set(group) <= {"name", "interval", "rules"} and group["name"] and group["rules"], group
            for r in group["rules"]:
                assert set(r) <= rule and r["alert"] and r["expr"], r
                # every alert waits (`for:`), says how bad it is and what it means
                assert r["for"] and r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
                assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


# --- the gateway's settings agree with the manifests --------------------------------------------------------


@pytest.mark.parametrize("package", PACKAGES)
def test_settings_ports_probes_and_volumes_agree(rendered: dict[str, list[Doc]], package: str) -> None:
    docs = rendered[package]
    deployment, container = _gateway(docs)
    settings = _gateway_settings(docs)  # raises SettingsError if the manifests' settings are not valid ones
    assert settings.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.grpc_port, "http": settings.http_port, "metrics": settings.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.grpc_port, probe  # native gRPC health probes
    assert settings.model_control_mode == "poll"  # versions published into the PVC are swapped in

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in deployment["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims[mounts[str(settings.model_repository)]] == "onnxgate-models"
    assert settings.predlog_dir is not None and settings.predlog() is not None
    assert claims[mounts[settings.predlog_dir]] == "onnxgate-predlog"
    replica = next(e for e in container["env"] if e["name"] == "ONNXGATE_PREDLOG_REPLICA_ID")
    assert replica["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # one log directory per pod

    # both Services reach the gRPC and HTTP ports by name; only the first one has the metrics port
    for name, expected in (("onnxgate", {"grpc", "http", "metrics"}), ("onnxgate-headless", {"grpc", "http"})):
        service = _one(docs, "Service", name)
        assert {p["targetPort"] for p in service["spec"]["ports"]} == expected, name
        for p in service["spec"]["ports"]:
            assert p["port"] == ports[p["targetPort"]], (name, p)
    assert _one(docs, "Service", "onnxgate-headless")["spec"]["clusterIP"] == "None"

    # SIGKILL only after the drain: the shutdown grace (and any drain delay the settings add) must fit
    drain = settings.shutdown_grace_s + sum(
        getattr(settings, f) for f in vars(settings) if "drain" in f and f.endswith("_s")
    )
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain

    # onnxruntime's runner threads match the CPUs requested (the default counts the node's cores)
    cpu = str(container["resources"]["requests"]["cpu"])
    cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert settings.inference_threads == max(1, math.ceil(cores)), (cpu, settings.inference_threads)


def test_the_services_select_only_the_gateways(rendered: dict[str, list[Doc]]) -> None:
    for package, docs in rendered.items():
        for service in (d for d in docs if d["kind"] == "Service"):
            selector = service["spec"]["selector"]
            for name, template in _pod_specs(docs).items():
                selected = _selects(selector, template["metadata"]["labels"])
                assert selected == (name == "onnxgate"), (package, service["metadata"]["name"], name)
        # the disruption budget and the autoscaler act on the gateways
        pdb = _one(docs, "PodDisruptionBudget", "onnxgate")
        assert _selects(pdb["spec"]["selector"]["matchLabels"], _pod_specs(docs)["onnxgate"]["metadata"]["labels"])
        hpa = _maybe(docs, "HorizontalPodAutoscaler", "onnxgate")
        if hpa is not None:
            assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "onnxgate"}


def test_pods_run_unprivileged_on_a_read_only_root(rendered: dict[str, list[Doc]]) -> None:
    """Every pod: non-root uid 10001, RuntimeDefault seccomp, no privilege escalation, no capabilities, a
    read-only root filesystem, and writable emptyDirs where the processes write outside their volumes:
    /tmp (DuckDB's spill, retrain's work directories) and $HOME (onnxruntime's cache)."""
    for package, docs in rendered.items():
        for name, template in _pod_specs(docs).items():
            where = f"k8s/{package}: {name}"
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] == UID, where
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
            for container in pod["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["capabilities"] == {"drop": ["ALL"]}, where
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                home = next(e["value"] for e in container["env"] if e["name"] == "HOME")
                for path in ("/tmp", home):
                    assert mounts.get(path) in empty_dirs, f"{where}: {path} is not a writable emptyDir"
                assert "resources" in container and container["resources"]["requests"], where


def test_overlays(rendered: dict[str, list[Doc]]) -> None:
    dev, prod = rendered["overlays/dev"], rendered["overlays/prod"]
    deployment, container = _gateway(dev)
    assert deployment["spec"]["replicas"] == 1
    assert _maybe(dev, "HorizontalPodAutoscaler", "onnxgate") is None

    deployment, container = _gateway(prod)
    # the autoscaler owns the replica count: a re-apply must not reset it
    assert "replicas" not in deployment["spec"]
    hpa = _one(prod, "HorizontalPodAutoscaler", "onnxgate")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = _one(prod, "PodDisruptionBudget", "onnxgate")
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable", 0) >= 2
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    pod = deployment["spec"]["template"]
    terms = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(
        t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        and _selects(t["podAffinityTerm"]["labelSelector"]["matchLabels"], pod["metadata"]["labels"])
        for t in terms
    )


def test_the_learning_loop_and_retrain_job_run_real_commands(rendered: dict[str, list[Doc]]) -> None:
    """The learn Deployment and the retrain CronJob call `onnxgate learn` / `retrain` with flags that parse,
    write the model repository the gateways read, and read the prediction log they write."""
    from onnxgate.server.cli import SUBCOMMANDS

    docs = rendered["overlays/prod"]
    gateway = _one(docs, "Deployment", "onnxgate")["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in gateway["volumes"] if "persistentVolumeClaim" in v
    }
    specs = _pod_specs(docs)
    jobs = [specs["onnxgate-learn"]["spec"], specs["onnxgate-retrain"]["spec"]]
    for spec in jobs:
        container = spec["containers"][0]
        command, *args = container["args"]
        parser = argparse.ArgumentParser()
        importlib.import_module(SUBCOMMANDS[command][0]).configure_parser(parser)
        parsed = parser.parse_args(args)  # the flags exist and parse
        assert str(parsed.model_repository) == "/models" and parsed.predlog_dir == "/predlog"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert not mounts["/models"].get("readOnly") and mounts["/predlog"]["readOnly"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for mount in ("/models", "/predlog"):
            claim = volumes[mounts[mount]["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims.values()  # the same volumes as the gateways


# --- alerts ---------------------------------------------------------------------------------------------


def test_the_prometheus_rule_carries_the_rules_file(rendered: dict[str, list[Doc]]) -> None:
    """promtool reads alerts/onnxgate-rules.yaml; the operator reads the PrometheusRule: the same groups."""
    groups = yaml.safe_load((ALERTS / "onnxgate-rules.yaml").read_text())["groups"]
    for package, docs in rendered.items():
        spec = _one(docs, "PrometheusRule", "onnxgate")["spec"]
        assert spec["groups"] == groups, f"k8s/{package}: run `python k8s/base/alerts/sync.py`"
    spec = importlib.util.spec_from_file_location("sync", ALERTS / "sync.py")
    assert spec is not None and spec.loader is not None
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    assert (K8S / "base" / "prometheusrule.yaml").read_text() == sync.render(), "run `python k8s/base/alerts/sync.py`"


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = _tool("promtool", ".ci/deps/prometheus.sh")
    check = subprocess.run(
        [promtool, "check", "rules", "onnxgate-rules.yaml"], cwd=ALERTS, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [promtool, "test", "rules", "onnxgate-rules.test.yaml"], cwd=ALERTS, capture_output=True, text=True
    )
    assert test.returncode == 0, test.stdout + test.stderr
    # every alert has a unit test that expects it to fire
    tests = yaml.safe_load((ALERTS / "onnxgate-rules.test.yaml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    quiet = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if not t["exp_alerts"]}
    alerts = {
        r["alert"] for g in yaml.safe_load((ALERTS / "onnxgate-rules.yaml").read_text())["groups"] for r in g["rules"]
    }
    assert fired == alerts and quiet == alerts


# --- the dashboard --------------------------------------------------------------------------------------

# Metrics onnxgate exports that its sources name only in ways the grep below cannot see, or that the
# metrics work of issue 9 adds (histograms, answers by code, load failures); and the process collector's.
EXTRA_METRICS = {
    "onnxgate_requests",
    "onnxgate_request_duration_seconds",
    "onnxgate_queue_duration_seconds",
    "onnxgate_compute_duration_seconds",
    "onnxgate_batch_size",
    "onnxgate_model_load_failures",
    "onnxgate_model_versions_loaded",
    "onnxgate_build_info",
    "process_cpu_seconds",
    "process_resident_memory_bytes",
    "up",
}
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "and",
    "or",
    "unless",
    "bool",
    "le",
    "inf",
    "nan",
}


def _known_metrics() -> set[str]:
    names = set(EXTRA_METRICS)
    for folder in ("server", "learning"):
        for path in (ROOT / folder).rglob("*.py"):
            names.update(re.findall(r'"(onnxgate_[a-z0-9_]+)"', path.read_text()))
    return names


def _metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers outside strings, braces and grouping clauses that
    are not functions (followed by '(') or keywords."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)
    expr = re.sub(r"(?<![\w:])\d[\w.]*", " ", expr)  # numbers and durations (0.99, 1h, 1e3)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = m.group(0)
        following = expr[m.end() :].lstrip()
        if following.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def _base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def _dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append((panel["title"], target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert inner is not None, query
            exprs.append((f"variable {variable['name']}", inner.group(1)))
    return exprs


def test_the_dashboard_names_only_exported_metrics() -> None:
    known = _known_metrics()
    for title, expr in _dashboard_exprs():
        names = _metric_names(expr)
        assert names, (title, expr)
        unknown = {n for n in names if n not in known and _base_name(n) not in known}
        assert not unknown, f"panel {title!r}: {sorted(unknown)} are not metrics onnxgate exports"
    # the panels the README describes
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    for wanted in (
        "Requests by status code",
        "Server error ratio",
        "Latency p50 / p99 by model",
        "Batch size distribution",
        "Live accuracy by version",
    ):
        assert wanted in titles


def test_the_alerts_name_only_exported_metrics() -> None:
    known = _known_metrics()
    for group in yaml.safe_load((ALERTS / "onnxgate-rules.yaml").read_text())["groups"]:
        for r in group["rules"]:
            names = _metric_names(r["expr"])
            unknown = {n for n in names if n not in known and _base_name(n) not in known}
            assert names and not unknown, f"alert {r['alert']}: {sorted(unknown)} are not metrics onnxgate exports"


def test_the_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule), with Grafana's variables given values."""
    promtool = _tool("promtool", ".ci/deps/prometheus.sh")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_dashboard_ships_as_a_labelled_config_map(rendered: dict[str, list[Doc]]) -> None:
    for docs in rendered.values():
        config_map = _one(docs, "ConfigMap", "onnxgate-dashboard")
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config_map["data"]["onnxgate-dashboard.json"]) == json.loads(DASHBOARD.read_text())


# --- the image ------------------------------------------------------------------------------------------


def test_dockerfile_lints_clean() -> None:
    assert not (K8S / "Dockerfile").exists()  # one Dockerfile, at the repository root
    run = subprocess.run([str(BIN / "hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_image_agrees_with_the_gateway_and_the_manifests(rendered: dict[str, list[Doc]]) -> None:
    """The image's user, HOME, ports, health check and default command match `onnxgate serve`'s defaults and
    what the manifests expect."""
    from onnxgate.server.config import Settings, load_settings

    text = (ROOT / "Dockerfile").read_text()
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    instructions = [(line.split()[0], line.split(maxsplit=1)[1]) for line in lines if line and not line.startswith("#")]
    stages = [arg for op, arg in instructions if op == "FROM"]
    assert len(stages) == 2 and all(s.startswith("python:3.11-slim") for s in stages)  # builder + runtime
    runtime = instructions[[op for op, _ in instructions].index("FROM", 1) :]
    ops: dict[str, list[str]] = {}
    for op, arg in runtime:
        ops.setdefault(op, []).append(arg)
    assert ops["USER"] == [str(UID)]
    defaults = Settings(example=True)
    exposed = {int(p) for p in ops["EXPOSE"][0].split()}
    assert exposed == {defaults.grpc_port, defaults.http_port, defaults.metrics_port}
    (healthcheck,) = ops["HEALTHCHECK"]
    assert f"127.0.0.1:{defaults.grpc_port}" in healthcheck and "grpc_health" in healthcheck
    assert [json.loads(e) for e in ops["ENTRYPOINT"]] == [["onnxgate"]]
    command, *args = json.loads(ops["CMD"][0])
    assert command == "serve"
    flags = {args[i].removeprefix("--").replace("-", "_"): args[i + 1] for i in range(0, len(args), 2)}
    settings = load_settings(env={}, flags=flags)
    assert str(settings.model_repository) == "/models" and settings.host == "0.0.0.0"
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(ops["ENV"])))
    for docs in rendered.values():
        for template in _pod_specs(docs).values():
            for container in template["spec"]["containers"]:
                assert {"name": "HOME", "value": env["HOME"]} in container["env"]
    assert any(f"--uid {UID}" in run and f"--home-dir {env['HOME']}" in run for run in ops["RUN"])
    # the runtime stage copies nothing: it installs the builder's wheels (mounted, never a layer)
    assert "COPY" not in ops
    assert any(
        "--mount=type=bind,from=builder" in run and "pip install --no-cache-dir --no-index" in run for run in ops["RUN"]
    )
    # the build context is an allow-list: what `pip wheel .` needs, no tests, virtual environments or data
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignored[0] == "*" and "!tests/" not in ignored and "!pyproject.toml" in ignored
