"""Training data: the Andalusia-MSMTU file layout and the spatial block split.

Layout (DESIGN.md section 4), as published on Zenodo (record 7752348)::

    ts_files/{square_id:07d}.json       ts_data.forward|backward.values|masks, 12 x 7
    labels/<level>/partitions/{train,validation,test}.csv
                                        square_id, one column per class, Class_max
    ancillary/topo_climatic.csv         square_id + ancillary variables

``values`` are surface reflectance (scale already applied) with 0 where ``masks`` is 0;
``backward`` is ``forward`` reversed in time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

PARTITIONS: tuple[str, ...] = ("train", "validation", "test")


def spatial_block_split(height: int, width: int, block: int,
                        fractions: Sequence[float] = (0.7, 0.15, 0.15),
                        seed: int = 0) -> np.ndarray:
    """(height, width) int8 map of partition indices into :data:`PARTITIONS`.

    The grid is cut into ``block`` x ``block`` squares and whole squares are assigned to
    partitions, so neighbouring (spatially autocorrelated) pixels never straddle train
    and test. Each partition gets at least one block when there are enough blocks.
    """
    rows, cols = -(-height // block), -(-width // block)
    n_blocks = rows * cols
    counts = np.floor(np.asarray(fractions, dtype=np.float64) * n_blocks).astype(int)
    if n_blocks >= len(PARTITIONS):
        counts = np.maximum(counts, [1 if f > 0 else 0 for f in fractions])
    counts[0] = n_blocks - counts[1:].sum()  # the remainder goes to training
    rng = np.random.default_rng([seed, 0x5B1])
    assignment = np.repeat(np.arange(len(PARTITIONS), dtype=np.int8), counts)[rng.permutation(n_blocks)]
    block_map = assignment.reshape(rows, cols)
    return np.repeat(np.repeat(block_map, block, axis=0), block, axis=1)[:height, :width]


def write_msmtu_layout(root: Path, *, square_ids: np.ndarray, values: np.ndarray,
                       masks: np.ndarray, ancillary: pd.DataFrame,
                       labels: Mapping[str, pd.DataFrame], partition: np.ndarray,
                       metadata: Sequence[Mapping] | None = None) -> None:
    """Write pixels in the Andalusia-MSMTU layout under ``root``.

    ``values`` and ``masks`` are (n, 12, 7); ``ancillary`` and each ``labels[level]`` have
    one row per pixel in ``square_ids`` order (labels: one abundance column per class);
    ``partition`` holds indices into :data:`PARTITIONS`.
    """
    ts_dir = root / "ts_files"
    ts_dir.mkdir(parents=True, exist_ok=True)
    values = np.where(masks, values, 0.0).round(4)
    for i, square_id in enumerate(square_ids):
        forward = {"values": values[i].tolist(), "masks": masks[i].astype(int).tolist()}
        backward = {"values": values[i][::-1].tolist(), "masks": masks[i][::-1].astype(int).tolist()}
        record = {"square_id": int(square_id), "ts_data": {"forward": forward, "backward": backward}}
        if metadata is not None:
            record["metadata"] = dict(metadata[i])
        (ts_dir / f"{int(square_id):07d}.json").write_text(json.dumps(record))

    (root / "ancillary").mkdir(parents=True, exist_ok=True)
    ancillary.insert(0, "square_id", square_ids)
    ancillary.to_csv(root / "ancillary" / "topo_climatic.csv", index=False)

    for level, table in labels.items():
        part_dir = root / "labels" / level / "partitions"
        part_dir.mkdir(parents=True, exist_ok=True)
        table = table.copy()
        table["Class_max"] = table.columns[np.argmax(table.to_numpy(), axis=1)] if len(table) \
            else pd.Series(dtype=object)
        table.insert(0, "square_id", square_ids)
        for index, name in enumerate(PARTITIONS):
            table[partition == index].to_csv(part_dir / f"{name}.csv", index=False)
