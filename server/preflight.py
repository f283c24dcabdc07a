"""What `onnxgate serve` checks before it starts anything: every port, file and directory it will need.

Each problem is one line that names the setting and how to change it, and all of them are found in one
pass: an operator learns at once that 8000, 8001 and 8002 are all taken, not one per attempt. Nothing is
bound or created here; the Gateway binds for real afterwards and still reports a port taken in between.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from onnxgate.server.auth import PLANES, TlsError, TokenFile, TokenFileError, check_tls
from onnxgate.server.config import Settings, env_name


def problems(settings: Settings, repository: Path | None) -> list[str]:
    """Every reason the gateway cannot start with these settings, one line each; [] when it can.
    `repository` is None when it is built at start (the example): only its path is checked then."""
    found: list[str] = []
    if repository is not None:
        found += _problem_list(unusable_repository(repository))
    found += port_problems(settings)
    for prefix in ("", "metrics_"):
        cert, key = getattr(settings, f"{prefix}tls_cert_file"), getattr(settings, f"{prefix}tls_key_file")
        if cert is not None and key is not None:
            try:
                check_tls(cert, key, getattr(settings, f"{prefix}tls_client_ca_file"), prefix)
            except TlsError as e:
                found.append(str(e))
    for plane in PLANES:
        path = getattr(settings, f"{plane}_token_file")
        if path is not None:
            try:
                TokenFile(f"{plane}_token_file", Path(path))
            except TokenFileError as e:
                found.append(str(e))
    found += _problem_list(_unusable_log_dir(settings))
    return found


def unusable_repository(root: Path) -> str | None:
    """Why `root` cannot serve as the model repository, in one line that says what to change; None if it can."""
    where = "set --model-repository or ONNXGATE_MODEL_REPOSITORY"
    if not root.exists():
        return f"model repository {root} does not exist: {where}"
    if not root.is_dir():
        return f"model repository {root} is not a directory: {where} to the directory holding the models"
    try:
        with os.scandir(root):
            pass
    except OSError as e:
        return f"model repository {root} cannot be read ({e.strerror}): fix its permissions or {where}"
    return None


def port_problems(settings: Settings) -> list[str]:
    """Each listening port that cannot be bound now, and ports given twice; off (-1) and any (0) pass."""
    wanted = [("grpc_port", settings.host, settings.grpc_port)]
    if settings.http_port >= 0:
        wanted.append(("http_port", settings.host, settings.http_port))
    if settings.metrics_port >= 0:
        wanted.append(("metrics_port", settings.metrics_host or settings.host, settings.metrics_port))
    found: list[str] = []
    seen: dict[tuple[str, int], str] = {}
    unresolvable: set[str] = set()
    for setting, host, port in wanted:
        if port == 0:
            continue
        if (host, port) in seen:
            found.append(
                f"{setting} {port} is also {seen[host, port]}: each port needs its own number; {choose(setting)}"
            )
            continue
        seen[host, port] = setting
        problem = probe_port(setting, host, port)
        if problem is not None and problem.startswith(f"host {host} "):
            if host in unresolvable:  # one line for a bad host, not one per port on it
                continue
            unresolvable.add(host)
        found += _problem_list(problem)
    return found


def probe_port(setting: str, host: str, port: int) -> str | None:
    """Why `port` on `host` cannot be bound now; None when it can (port 0, any free port, always can)."""
    if port == 0:
        return None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        return f"host {host} cannot be resolved ({e.strerror}): set --host or ONNXGATE_HOST"
    with socket.socket(family, kind, proto) as probe:
        # as the real server does: a port whose old connections linger in TIME_WAIT is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            return port_error(setting, host, port, e)
    return None


def port_error(setting: str, host: str, port: int, error: OSError) -> str:
    """The line for a port that failed to bind with `error`."""
    if error.errno == errno.EADDRNOTAVAIL:
        return f"host {host} is not an address of this machine: set --host or ONNXGATE_HOST"
    if error.errno == errno.EADDRINUSE:
        reason = "is in use (another server? Triton uses 8000-8002 too)"
    elif error.errno == errno.EACCES:
        reason = "needs privileges (ports below 1024)"
    else:
        reason = f"cannot be bound ({error.strerror or error})"
    return f"{setting} {port} on {host} {reason}: {choose(setting)}"


def choose(setting: str) -> str:
    flag = "--" + setting.replace("_", "-")
    off = {"metrics_port": " (-1 turns metrics off)", "http_port": " (-1 turns HTTP/REST off)"}.get(setting, "")
    return f"choose another with {flag} or {env_name(setting)}{off}"


def _unusable_log_dir(settings: Settings) -> str | None:
    """A local prediction-log directory that cannot be created or written. An object store is checked when
    the gateway opens it (it needs the network); its local write-ahead directory is checked here."""
    if settings.predlog_dir is None:
        return None
    if "://" in settings.predlog_dir:
        local, setting = settings.predlog_local_dir, "predlog_local_dir"
        if local is None:
            return None
    else:
        local, setting = Path(settings.predlog_dir).expanduser(), "predlog_dir"
    flag = "--" + setting.replace("_", "-")
    existing = local
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the directory it would be created in
    if not existing.is_dir():
        return f"{setting} {local}: {existing} is not a directory: set {flag} or {env_name(setting)} to a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "cannot be written" if existing == local else f"cannot be created in {existing}"
        return f"{setting} {local} {what}: fix its permissions, or set {flag} or {env_name(setting)}"
    return None


def _problem_list(problem: str | None) -> list[str]:
    return [] if problem is None else [problem]
