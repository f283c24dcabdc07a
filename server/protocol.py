"""The protocol's answers other than inference, built once for both edges.

Each function reads the repository and returns the Open Inference Protocol message; the gRPC edge
sends it as it is, the REST edge as its JSON form (`rest_json.message_to_json`), which is how the
protocol defines its REST bodies. One source, so metadata, configs, statistics and the index are the
same on either protocol.
"""

from __future__ import annotations

from collections.abc import Mapping

from onnxgate import __version__
from onnxgate.server.errors import GatewayError, InvalidArgument
from onnxgate.server.modelspec import PLATFORM
from onnxgate.server.pb import grpc_service_pb2 as pb
from onnxgate.server.pb import model_config_pb2 as mc
from onnxgate.server.repository import Repository
from onnxgate.server.stats import Duration, VersionStats

# only what is implemented end to end: perf_analyzer reads 'statistics' to decide to call it;
# binary_tensor_data is the REST edge's (Triton lists it on both protocols too)
EXTENSIONS = ("classification", "model_repository", "model_configuration", "statistics", "binary_tensor_data")


def server_metadata() -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name="onnxgate", version=__version__, extensions=EXTENSIONS)


def model_ready(repository: Repository, name: str, version: str, draining: bool) -> bool:
    try:
        repository.get(name, version)
    except GatewayError:
        return False
    return not draining


def model_metadata(repository: Repository, name: str, version: str) -> pb.ModelMetadataResponse:
    served_version = repository.get(name, version)
    served = repository.served(name)
    meta = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=name,
        versions=[str(v) for v in sorted(served.versions)],
        platform=PLATFORM,
        inputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in served_version.spec.inputs],
        outputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in served_version.spec.outputs],
    )


def model_config(repository: Repository, name: str, version: str) -> mc.ModelConfig:
    return repository.get(name, version).spec.config


def model_statistics(repository: Repository, name: str, version: str) -> pb.ModelStatisticsResponse:
    if name:
        served = [repository.served(name)]
        if version:
            repository.get(name, version)
    else:
        if version:
            raise InvalidArgument("a version needs a model name")
        served = repository.all_served()
    stats = []
    for model in served:
        for number, served_version in sorted(model.versions.items()):
            if not version or version == str(number):
                stats.append(_statistics(model.name, str(number), served_version.stats))
    return pb.ModelStatisticsResponse(model_stats=stats)


def repository_index(repository: Repository, ready_only: bool) -> pb.RepositoryIndexResponse:
    entry = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[
            entry(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in repository.index(ready_only=ready_only)
        ]
    )


def load_arguments(parameters: Mapping[str, object]) -> tuple[str | None, dict[str, bytes]]:
    """Triton's load parameters -> (config JSON, {"<version>/<name>": bytes}). The edges hand over
    `config` as str and `file:` parameters as bytes (REST decodes their base64 first)."""
    config: str | None = None
    files: dict[str, bytes] = {}
    for key, value in parameters.items():
        if key == "config":
            if not isinstance(value, str):
                raise InvalidArgument("load parameter 'config' must be a string holding the ModelConfig as JSON")
            config = value
        elif key.startswith("file:"):
            if not isinstance(value, bytes):
                raise InvalidArgument(f"load parameter {key!r} must carry the file's bytes")
            files[key.removeprefix("file:")] = value
        else:
            raise InvalidArgument(f"unknown load parameter {key!r}; accepted: 'config', 'file:<version>/<name>'")
    if files and config is None:
        raise InvalidArgument("uploading model files needs the 'config' parameter too (as Triton requires)")
    return config, files


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(name: str, version: str, s: VersionStats) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=name,
        version=version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
            cache_hit=_duration(s.cache_hit),
            cache_miss=_duration(s.cache_miss),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.batches.items())
        ],
    )
