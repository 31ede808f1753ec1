"""Train: hetero GraphSAGE on LinkNeighborLoader mini-batches, AMP, torchrun DDP."""
from scalable_rec.train.config import TrainConfig
from scalable_rec.train.loop import TrainResult, train
from scalable_rec.model.recommender import ModelConfig, Recommender

__all__ = ["ModelConfig", "Recommender", "TrainConfig", "TrainResult", "train"]
