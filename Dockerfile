# syntax=docker/dockerfile:1
# The gateway image: `docker build -t onnxgate:0.1.0 .` from the repository root (BuildKit, the default
# builder since Docker 23). The builder stage turns the sources into onnxgate's wheel beside the wheels of
# its dependencies; the runtime stage installs only those wheels, with no sources, compiler or pip cache.
# `--build-arg EXTRAS=converters` adds an extra (the learning loop's retrain of boosters needs it).
# No model repository inside: mount one at /models (k8s/: a PersistentVolumeClaim).

FROM python:3.11-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY server ./server
COPY converters ./converters
COPY learning ./learning
# the import namespace: onnxgate/ links to the folders above (the wheel holds the files themselves)
COPY onnxgate ./onnxgate
ARG EXTRAS=""
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"

FROM python:3.11-slim
# uid 10001, as the Kubernetes manifests run it; HOME is where onnxruntime keeps its small cache
# (an emptyDir under Kubernetes, whose root filesystem is read-only)
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/onnxgate --shell /usr/sbin/nologin onnxgate
# the wheels are mounted from the builder, not copied: they never become a layer of this image
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl
# pip compiled the bytecode at install time: nothing needs to write .pyc files at run time
ENV HOME=/home/onnxgate \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 10001
WORKDIR /home/onnxgate
# HTTP/REST, gRPC, Prometheus /metrics
EXPOSE 8000 8001 8002
# grpc.health.v1 on the gRPC port: SERVING once the repository is loaded, NOT_SERVING while draining
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:8001')).Check(h.HealthCheckRequest(), timeout=2).status; sys.exit(s != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["onnxgate"]
CMD ["serve", "--model-repository", "/models", "--host", "0.0.0.0"]
