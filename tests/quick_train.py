"""A short training configuration shared by the training tests."""

from __future__ import annotations

from scalable_rec.train import TrainConfig


def quick_cfg(**overrides) -> TrainConfig:
    """Two epochs of 1,024-edge batches over 5/3 sampled neighbours, no progress bar."""
    base = dict(epochs=2, batch_size=1024, num_neighbors=[5, 3], progress=False, patience=5)
    return TrainConfig(**{**base, **overrides})
