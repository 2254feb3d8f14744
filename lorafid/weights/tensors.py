"""The one tensor reader: every tensor of a pair of sources by name, and one tensor's bytes.

The audit, the adapter readers, the extraction and the layer-streamed forward all read
weights through these three functions, so a change to how bytes arrive (pinned buffers,
shards, header limits) is made here once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from lorafid.errors import LorafidError
from lorafid.weights.safetensors_format import TensorInfo, torch_dtype
from lorafid.weights.source import Source

HEADER_READERS = 8  # parallel header reads while planning


def tensor_indexes(*sources: Source, max_header_bytes: int | None = None) -> tuple[dict[str, TensorInfo], ...]:
    """Every tensor of each source by name, across shards; a name in two shards is an error.

    A header longer than ``max_header_bytes`` is refused from its length, before it is fetched.
    All headers of all sources are read at once (8 at a time): a 70B pair has 60 shards,
    and one round trip after another would cost seconds before the first byte of weights.
    """
    jobs = [(side, file) for side, source in enumerate(sources) for file in source.weight_files()]
    with ThreadPoolExecutor(max_workers=max(1, min(HEADER_READERS, len(jobs)))) as pool:
        # map() yields in submission order: the first failing file (in order) is the one reported.
        headers = list(pool.map(lambda job: sources[job[0]].read_header(job[1], max_header_bytes), jobs))
    out: tuple[dict[str, TensorInfo], ...] = tuple({} for _ in sources)
    for (side, file), header in zip(jobs, headers, strict=True):
        source, tensors = sources[side], out[side]
        for name, info in header.tensors.items():
            if name in tensors:
                raise LorafidError(
                    f"Tensor {name} appears in both {tensors[name].file} and {file} of {source.info.spec}; "
                    "the checkpoint is inconsistent. Pick a revision with one copy of each tensor."
                )
            tensors[name] = info
    return out


def read_bytes(source: Source, info: TensorInfo) -> bytes:
    """One tensor's raw little-endian bytes, as stored (for copying a tensor unchanged)."""
    buffer = bytearray(info.size_bytes)
    source.read_into(info.file, info.start, info.end, memoryview(buffer))
    return bytes(buffer)


def read_tensor(source: Source, info: TensorInfo, pin: bool = False) -> torch.Tensor:
    """Read one tensor's bytes into a fresh buffer (pinned for a GPU copy when ``pin``)
    and view them with its dtype and shape. The tensor owns its memory."""
    buffer = torch.empty(info.size_bytes, dtype=torch.uint8, pin_memory=pin)
    source.read_into(info.file, info.start, info.end, buffer.numpy().data)
    # safetensors stores little-endian; torch views in native order (little-endian on
    # every platform torch ships for), so no byte swap is needed.
    return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)
