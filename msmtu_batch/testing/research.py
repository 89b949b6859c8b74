"""The research code's way of running BRITS, kept as the reference that tests check the
production engines against and the baseline that ``msmtu-batch bench`` measures them against:
the per-step formulation (:class:`ResearchBRITS`, the same parameters as
:class:`~msmtu_batch.model.brits.BRITS`) fed one JSON file per pixel through a DataLoader."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from msmtu_batch.inputs.training_data import MSMTU_VALUE_SCALE, PARTITIONS
from msmtu_batch.model.brits import BRITS, RITS, BritsConfig, BritsOutput, LossWeights, brits_loss
from msmtu_batch.model.preprocess import Standardizer, compute_deltas


class ResearchRITS(RITS):
    """The straightforward per-step formulation of the research code: decays, combination
    weight and losses computed inside the time loop, one small operation after another.
    Same parameters as :class:`RITS`, so the same weights load into both."""

    def __init__(self, cfg: BritsConfig) -> None:
        super().__init__(cfg)
        self.sigmoid_combination = cfg.combine_activation == "sigmoid"

    def forward(self, values, masks, deltas, ancillary, with_loss=True):
        batch, steps, _ = values.shape
        h = values.new_zeros(batch, self.hidden)
        c = values.new_zeros(batch, self.hidden)
        imputed, loss = [], values.new_zeros(())
        for t in range(steps):
            x, m, d = values[:, t], masks[:, t], deltas[:, t]
            h = h * self.decay_hidden(d)
            x_hist = self.history_regression(h)
            z_feat = self.feature_regression(m * x + (1 - m) * x_hist)
            alpha = self.combine(torch.cat([self.decay_input(d), m], dim=1))
            if self.sigmoid_combination:
                alpha = torch.sigmoid(alpha)
            x_comb = alpha * z_feat + (1 - alpha) * x_hist
            if with_loss:
                observed = m.sum() + 1e-5
                for estimate in (x_hist, z_feat, x_comb):
                    loss = loss + ((estimate - x).abs() * m).sum() / observed
            x_filled = m * x + (1 - m) * x_comb
            h, c = self.cell(torch.cat([x_filled, m], dim=1), (h, c))
            imputed.append(x_filled)
        return self.logits(h, ancillary), torch.stack(imputed, dim=1), loss / (3 * steps)


class ResearchBRITS(BRITS):
    """BRITS as the research code runs it: one direction after the other, each in the
    per-step formulation of :class:`ResearchRITS`; the same parameters as :class:`BRITS`."""

    def __init__(self, cfg: BritsConfig) -> None:
        super().__init__(cfg)
        self.forward_pass, self.backward_pass = ResearchRITS(cfg), ResearchRITS(cfg)

    def forward(self, values, masks, deltas_forward, deltas_backward, ancillary=None, with_loss=True):
        logits_f, imputed_f, loss_f = self.forward_pass(values, masks, deltas_forward, ancillary, with_loss)
        logits_b, imputed_b, loss_b = self.backward_pass(values.flip(1), masks.flip(1), deltas_backward,
                                                         ancillary, with_loss)
        return BritsOutput.of_directions(logits_f, logits_b, imputed_f, imputed_b.flip(1), 0.5 * (loss_f + loss_b),
                                         with_loss)


class JsonPixelDataset(Dataset):
    """Research-code style: every item opens and parses its pixel's JSON file."""

    def __init__(self, root: Path, level: str, partition: str, ancillary_names: tuple[str, ...],
                 bands: Standardizer, ancillary: Standardizer | None) -> None:
        self.root = Path(root)
        labels = pd.read_csv(self.root / "labels" / level / "partitions" / f"{partition}.csv")
        self.classes = [c for c in labels.columns if c not in ("square_id", "Class_max")]
        self.ids = labels["square_id"].to_numpy()
        self.labels = labels[self.classes].to_numpy(np.float32)
        table = pd.read_csv(self.root / "ancillary" / "topo_climatic.csv").set_index("square_id")
        self.ancillary = table.loc[self.ids, list(ancillary_names)].to_numpy(np.float32)
        self.bands, self.ancillary_stats = bands, ancillary

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        record = json.loads((self.root / "ts_files" / f"{int(self.ids[i]):07d}.json").read_text())
        forward = record["ts_data"]["forward"]
        values = np.asarray(forward["values"], np.float32) * np.float32(1 / MSMTU_VALUE_SCALE)
        masks = np.asarray(forward["masks"], np.float32)
        item = {"values": self.bands.apply(values, masks), "masks": masks,
                "deltas_forward": compute_deltas(masks), "deltas_backward": compute_deltas(masks[::-1]),
                "label": self.labels[i]}
        if self.ancillary_stats is not None:
            item["ancillary"] = self.ancillary_stats.apply(self.ancillary[i])
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in item.items()}


def naive_training_throughput(root: Path, level: str, model: BRITS, bands: Standardizer,
                              ancillary_names: tuple[str, ...], ancillary: Standardizer | None,
                              batch_size: int = 256, max_batches: int | None = None) -> float:
    """Training pixels/s of one epoch fed per-sample from JSON files through a DataLoader."""
    dataset = JsonPixelDataset(root, level, PARTITIONS[0], ancillary_names, bands, ancillary)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seen, start = 0, time.perf_counter()
    for step, batch in enumerate(loader):
        out = model(batch["values"], batch["masks"], batch["deltas_forward"], batch["deltas_backward"],
                    batch.get("ancillary"))
        loss, _ = brits_loss(out, batch["label"], LossWeights())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        seen += len(batch["label"])
        if max_batches is not None and step + 1 >= max_batches:
            break
    return seen / (time.perf_counter() - start)


def research_inference_throughput(root: Path, level: str, artifact, out_csv: Path, batch_size: int = 256) -> float:
    """Pixels/s of inference the research-code way: one JSON per pixel through a DataLoader
    into the per-step model, predictions appended to a CSV per batch."""
    model = ResearchBRITS(artifact.config)
    model.load_state_dict(artifact.model.state_dict())
    model.eval()
    seen, start = 0, time.perf_counter()
    for partition in PARTITIONS:
        dataset = JsonPixelDataset(root, level, partition, artifact.ancillary_names, artifact.band_stats,
                                   artifact.ancillary_stats)
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size=batch_size):
                out = model(batch["values"], batch["masks"], batch["deltas_forward"], batch["deltas_backward"],
                            batch.get("ancillary"))
                pd.DataFrame(out.abundance.numpy(), columns=list(artifact.classes)).to_csv(
                    out_csv, mode="a", header=not out_csv.exists(), index=False)
                seen += len(batch["values"])
    return seen / (time.perf_counter() - start)
