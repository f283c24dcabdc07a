"""onnxgate: a polyglot model-serving gateway speaking the Open Inference Protocol v2 over gRPC.

One import namespace for everything the distribution installs:

    onnxgate.server       the gateway (gRPC edge, repository, runtime, prediction log, feedback)
    onnxgate.converters   models of other ecosystems -> checked ONNX versions (`onnxgate convert`)
    onnxgate.client       a typed Python client for inference and feedback
    onnxgate/proto/       the .proto files, for clients in other languages

In the repository `server/`, `converters/` and `proto/` stay at the top; `onnxgate/` links to them, so
the source tree and an installed wheel import the same names.
"""

__version__ = "0.1.0"
