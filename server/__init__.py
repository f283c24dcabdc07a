"""The gateway: gRPC edge -> tensors -> repository -> model (batcher) -> runtime; prediction log and feedback."""
