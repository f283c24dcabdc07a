"""The descriptor pool that holds onnxgate's generated messages (see proto/generate.py)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
