"""An opt-in response cache per model version, for models whose inputs repeat.

Turned on per model by Triton's own config field, in its config.pbtxt:

    response_cache { enable: true }

Each version of such a model keeps a least-recently-used map from a request's key to its answer (the
outputs after classification), bounded by `--response-cache-bytes` (the outputs' bytes, per version;
0 turns every cache off). The key is a blake2b digest of the version, the requested outputs, the
classification asked for and each input's name, datatype, shape and raw bytes (a BYTES tensor: each
element's length and bytes), so equal requests hit and any difference misses. A hit skips onnxruntime
and returns the cached arrays themselves, read-only (no copy); the answer of a miss is stored the same
way, so its arrays are read-only too (a request's rows of a batched run are copied once when stored,
so an entry never holds the whole batch's output alive).

Statistics as Triton's: a hit counts as a successful request (`success`) and in `cache_hit` (the time to
build the key and look it up), not in `inference_count`, `execution_count`, `queue` or `compute_infer`; a
miss counts as any request and in `cache_miss` (the lookup and the insertion). Prometheus:
onnxgate_response_cache_hits_total and _misses_total, and the bytes and entries held.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from hashlib import blake2b

import numpy as np

Tensors = dict[str, np.ndarray]
OVERHEAD = 64  # bytes counted per output array besides its data (a BYTES element: 8 more each)


def _field(h: blake2b, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def cache_key(
    version: int, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], classification: Mapping[str, int]
) -> bytes:
    """The digest of everything the answer depends on; every part length-prefixed, so no two requests share one."""
    h = blake2b(digest_size=16)
    h.update(version.to_bytes(8, "little", signed=True))
    h.update(len(outputs).to_bytes(8, "little"))
    for name in outputs:
        _field(h, name.encode())
    h.update(len(classification).to_bytes(8, "little"))
    for name, k in sorted(classification.items()):
        _field(h, name.encode())
        h.update(k.to_bytes(8, "little", signed=True))
    h.update(len(inputs).to_bytes(8, "little"))
    for name in sorted(inputs):
        array = inputs[name]
        _field(h, name.encode())
        _field(h, array.dtype.str.encode())
        h.update(len(array.shape).to_bytes(8, "little"))
        for dim in array.shape:
            h.update(dim.to_bytes(8, "little"))
        if array.dtype == object:
            for element in array.flat:
                _field(h, element if isinstance(element, bytes) else str(element).encode())
        else:
            h.update(np.ascontiguousarray(array).data)
    return h.digest()


def answer_bytes(outputs: Mapping[str, np.ndarray]) -> int:
    """What an answer holds, as the cache counts it."""
    total = 0
    for array in outputs.values():
        total += OVERHEAD
        if array.dtype == object:
            total += sum(8 + (len(e) if isinstance(e, bytes | str) else 8) for e in array.flat)
        else:
            total += array.nbytes
    return total


class ResponseCache:
    """A bounded LRU of answers by key; used from the event loop's thread only."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[bytes, tuple[Tensors, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Tensors | None:
        """The cached answer (a new dict of the same read-only arrays), or None; counts the hit or miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return dict(entry[0])

    def put(self, key: bytes, outputs: Tensors) -> None:
        """Store an answer (its arrays made read-only); one larger than the whole bound is not stored."""
        size = answer_bytes(outputs)
        if size > self.max_bytes:
            return
        held: Tensors = {}
        for name, array in outputs.items():
            base = array.base
            if isinstance(base, np.ndarray) and base.nbytes > array.nbytes:
                array = array.copy()  # a request's rows of a batch: hold them, not the whole batch's output
            array.flags.writeable = False
            held[name] = array
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (held, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
            self.evictions += 1
