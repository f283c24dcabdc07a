"""The Kubernetes manifests build with kustomize, validate strictly, and match the gateway's flags."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, object]]:
    kubectl = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if kubectl is None:
        pytest.fail("kubectl is missing: .ci/deps/k8s.sh installs it")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s")], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_strict_schema_validation(manifests: list[dict[str, object]], tmp_path: Path) -> None:
    built = tmp_path / "built.yaml"
    built.write_text(yaml.safe_dump_all(manifests))
    run = subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "-k", "1.32.0", str(built)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_probes_and_args_match_the_gateway(manifests: list[dict[str, object]]) -> None:
    from onnxgate.server.config import load_settings

    deployment = next(d for d in manifests if d["kind"] == "Deployment" and d["metadata"]["name"] == "onnxgate")  # type: ignore[index]
    container = deployment["spec"]["template"]["spec"]["containers"][0]  # type: ignore[index]
    args = container["args"]
    assert args[0] == "serve"
    flags = {args[i].removeprefix("--").replace("-", "_"): args[i + 1] for i in range(1, len(args), 2)}
    env = {e["name"]: e.get("value", "pod-name-from-the-downward-api") for e in container["env"]}
    settings = load_settings(env=env, flags=flags)  # the manifest's settings are valid ones
    assert settings.host == "0.0.0.0"
    assert settings.predlog_dir is not None and settings.predlog() is not None
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(settings.predlog_dir) in mounts and "/models" in mounts
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert grpc_port == settings.grpc_port
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port
    http_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    assert http_port == settings.http_port
    service = next(d for d in manifests if d["kind"] == "Service" and d["metadata"]["name"] == "onnxgate")  # type: ignore[index]
    assert {p["targetPort"] for p in service["spec"]["ports"]} >= {"grpc", "http", "metrics"}  # type: ignore[index]
    termination = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]  # type: ignore[index]
    assert termination > settings.shutdown_grace_s


def test_the_learning_loop_and_retrain_job_run_real_commands(manifests: list[dict[str, object]]) -> None:
    """The learn Deployment and the retrain CronJob call `onnxgate learn` / `retrain` with flags that parse,
    write the model repository the gateways read, and read the prediction log they write."""
    import argparse
    import importlib

    from onnxgate.server.cli import SUBCOMMANDS

    gateway = next(d for d in manifests if d["kind"] == "Deployment" and d["metadata"]["name"] == "onnxgate")  # type: ignore[index]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in gateway["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }  # type: ignore[index]
    jobs = [
        d["spec"]["template"]["spec"]
        for d in manifests
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "onnxgate-learn"
    ]  # type: ignore[index]
    jobs += [d["spec"]["jobTemplate"]["spec"]["template"]["spec"] for d in manifests if d["kind"] == "CronJob"]  # type: ignore[index]
    assert len(jobs) == 2
    for spec in jobs:
        container = spec["containers"][0]  # type: ignore[index]
        command, *args = container["args"]
        parser = argparse.ArgumentParser()
        importlib.import_module(SUBCOMMANDS[command][0]).configure_parser(parser)
        parsed = parser.parse_args(args)  # the flags exist and parse
        assert str(parsed.model_repository) == "/models" and parsed.predlog_dir == "/predlog"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert not mounts["/models"].get("readOnly") and mounts["/predlog"]["readOnly"]
        volumes = {v["name"]: v for v in spec["volumes"]}  # type: ignore[index]
        for mount in ("/models", "/predlog"):
            claim = volumes[mounts[mount]["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims.values()  # the same volumes as the gateways


def test_the_service_selects_only_the_gateways(manifests: list[dict[str, object]]) -> None:
    service = next(d for d in manifests if d["kind"] == "Service")
    selector = service["spec"]["selector"]  # type: ignore[index]
    for d in manifests:
        if d["kind"] not in ("Deployment", "CronJob"):
            continue
        template = d["spec"]["template"] if d["kind"] == "Deployment" else d["spec"]["jobTemplate"]["spec"]["template"]  # type: ignore[index]
        labels = template["metadata"]["labels"]
        selected = all(labels.get(k) == v for k, v in selector.items())
        assert selected == (d["metadata"]["name"] == "onnxgate"), d["metadata"]["name"]  # type: ignore[index]


def test_dockerfile_lints_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    run = subprocess.run([str(hadolint), str(ROOT / "k8s" / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
