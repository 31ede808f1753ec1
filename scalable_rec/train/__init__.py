"""Train: hetero GraphSAGE on LinkNeighborLoader mini-batches, AMP, torchrun DDP."""

from scalable_rec.model.recommender import ModelConfig, Recommender
from scalable_rec.train.config import TrainConfig
from scalable_rec.train.loop import TrainResult, train

__all__ = ["ModelConfig", "Recommender", "TrainConfig", "TrainResult", "train"]
