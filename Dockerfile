# The gateway image: `docker build -f k8s/Dockerfile -t onnxgate:0.1.0 .` from the repository root.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY server ./server
COPY converters ./converters
COPY learning ./learning
# the import namespace: onnxgate/ links to the folders above (pip copies the files into the package)
COPY onnxgate ./onnxgate
RUN pip install --no-cache-dir . \
    && useradd --uid 10001 --no-create-home onnxgate

USER 10001
EXPOSE 8000 8001 8002
ENTRYPOINT ["onnxgate"]
CMD ["serve", "--model-repository", "/models", "--host", "0.0.0.0"]
