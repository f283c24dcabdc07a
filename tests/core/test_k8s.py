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

    deployment = next(d for d in manifests if d["kind"] == "Deployment")
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
    termination = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]  # type: ignore[index]
    assert termination > settings.shutdown_grace_s


def test_dockerfile_lints_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    run = subprocess.run([str(hadolint), str(ROOT / "k8s" / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
