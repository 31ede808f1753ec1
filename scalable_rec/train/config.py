"""Training settings (``TrainConfig``) and the device and precision they resolve to.

torch is imported only by the functions that resolve a device or a dtype, so that the
command line can parse and validate its flags before torch loads (docs/design.md, "Start-up").
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from scalable_rec.dist_env import DistEnv

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Optimisation, supervision, model selection and input-pipeline settings (design:
    docs/design.md#supervision-and-ranking-head).

    Args:
        epochs: Most epochs to train, positive; early stopping may end sooner.
        batch_size: Labelled edges per step and rank, positive.
        num_neighbors: Neighbours sampled per hop, one positive entry per GraphSAGE layer;
            ``-1`` takes all.
        lr: AdamW learning rate of the dense weights, positive.
        weight_decay: AdamW decoupled weight decay of the linear layers; embedding tables and
            biases are not decayed.
        supervision: How a batch's target edges are kept out of its own message passing:
            ``exclude_targets`` (removed, with their reverse edges, from the batch's subgraph),
            ``disjoint`` (a fixed ``disjoint_ratio`` share supervises) or ``none``.
        disjoint_ratio: Share of training edges that supervise with ``disjoint``, in (0, 1).
        relevant_min: Ratings at or above this are relevant: the ranking head's positives and
            Recall/NDCG's hits.
        optimizer: Optimiser of the dense weights: ``adamw`` (decoupled decay, tables and
            biases undecayed) or ``adam`` (coupled L2 on every parameter).
        table_optimizer: Optimiser of the user/movie tables: ``adamw`` (dense), ``rowwise_adagrad``
            (sparse, one state float per row) or ``auto`` (row-wise from
            ``sparse_tables_min_rows`` users + movies on).
        table_lr: Learning rate of ``rowwise_adagrad`` on the tables, positive.
        sparse_tables_min_rows: Users + movies from which ``table_optimizer`` ``auto`` picks
            ``rowwise_adagrad``; non-negative.
        val_memory_mb: MiB of one block of validation ranking scores (users × movies × 4
            bytes), positive; bounds validation's working memory.
        node_shared_tables: Under DDP on CPU with row-wise tables, the ranks of one machine
            share one copy of the tables in ``/dev/shm`` (else each keeps its own); results
            are identical either way.
        heap_mmap_threshold_kb: glibc mmap threshold in KiB set when training over the mapped
            graph index starts, in [0, 32768] (0: glibc's dynamic threshold), or -1 (auto):
            1024 when several ranks of the job share this node, else 0.
        select_metric: Validation metric that picks ``best.pt`` and stops early: ``recall``
            (Recall@10 of the ranking head), ``rmse``, or ``last`` (no selection, no early
            stopping: ``best.pt`` holds the last epoch's weights).
        refit: After validation has chosen the epoch count, train again from scratch on
            training + validation edges for that many epochs; that refit is the run's model
            (with ``select_metric`` ``last`` only this second step runs). Needs whole epochs.
        rank_loss_weight: Weight of the ranking head's in-batch softmax loss added to the
            rating loss, non-negative; ignored without a ranking head.
        rank_dislike_weight: Weight (a relevant edge's is 1), non-negative, of ``-log(1 - p)``
            per disliked labelled edge, ``p`` its movie's probability in its user's in-batch
            softmax: dislikes are pushed down. 0 turns it off.
        rank_dislike_below: Ratings below this are dislikes for ``rank_dislike_weight``, at
            most ``relevant_min``; ``None``: ``relevant_min`` (every rating that is not relevant).
        ema_decay: Decay in [0, 1) of an exponential moving average of the weights, which
            validation scores and ``best.pt`` holds; 0 turns it off. Not kept with row-wise
            tables.
        logq_correction: Subtract each in-batch negative's log sampling probability from its
            logit, so the ranking logits estimate a full-catalog softmax.
        rank_id_l2: L2 penalty, non-negative, on the ranking head's own user and movie vectors
            over the rows a batch uses; 0 turns it off.
        loss: Rating loss: ``mse`` or ``weighted_mse`` (each half-star class weighted by its
            inverse training frequency, mean weight 1).
        patience: Epochs without a better ``select_metric`` before training stops.
        precision: ``fp32``, ``bf16`` (CPU or CUDA) or ``fp16`` (CUDA, with GradScaler).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        sampler: Neighbour sampler: ``pyg`` (PyG's ``LinkNeighborLoader`` on the CPU), ``torch``
            (plain torch on the training device, CUDA or CPU) or ``auto`` (``torch`` on a CUDA
            device the graph fits, else ``pyg``); see docs/gpu.md#gpu-sampler.
        num_workers: Sampler worker processes per rank; ``-1``: 0 on CPU, on CUDA the rank's
            cores but one (``scalable_rec.train.workers``).
        seed: Seed of model initialisation, shuffling and neighbour sampling.
        steps_per_epoch: End each epoch after this many steps (positive; validation still
            runs); unset: a full pass.
        max_steps: Stop after this many optimiser steps in total, positive, writing
            ``last.pt`` for ``resume``; unset: no cap.
        checkpoint_every: Also write ``last.pt`` every N steps; 0: at epoch ends only.
        resume: Continue from ``<run_dir>/last.pt`` (a job restarted under torchrun resumes
            without it).
        progress: Show progress bars (rank 0 only).
        stop_check_every: Under DDP, steps between the checks (one all-reduce) of whether any
            rank got SIGTERM/SIGINT, so all ranks stop at the same step; positive.
        collective_timeout_s: Seconds a collective waits for the other ranks before it fails
            naming this option, positive.
    """

    epochs: int = 40
    batch_size: int = 2048
    num_neighbors: list[int] = field(default_factory=lambda: [10, 5])
    lr: float = 0.003
    weight_decay: float = 1e-4
    supervision: Literal["exclude_targets", "disjoint", "none"] = "exclude_targets"
    disjoint_ratio: float = 0.3
    relevant_min: float = 4.0
    optimizer: Literal["adamw", "adam"] = "adamw"
    table_optimizer: Literal["auto", "adamw", "rowwise_adagrad"] = "auto"
    table_lr: float = 0.05
    sparse_tables_min_rows: int = 100_000
    val_memory_mb: int = 32
    node_shared_tables: bool = True
    heap_mmap_threshold_kb: int = -1
    select_metric: Literal["recall", "rmse", "last"] = "recall"
    refit: bool = False
    loss: Literal["mse", "weighted_mse"] = "mse"
    rank_loss_weight: float = 1.0
    rank_dislike_weight: float = 0.0
    rank_dislike_below: float | None = None
    ema_decay: float = 0.99
    logq_correction: bool = True
    rank_id_l2: float = 0.05
    patience: int = 6
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = "auto"
    sampler: Literal["auto", "pyg", "torch"] = "auto"
    num_workers: int = -1
    seed: int = 0
    steps_per_epoch: int | None = None
    max_steps: int | None = None
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = True
    stop_check_every: int = 1
    collective_timeout_s: float = 1800.0

    def dislike_below(self) -> float:
        """Ratings below this are dislikes for ``rank_dislike_weight``."""
        return self.relevant_min if self.rank_dislike_below is None else self.rank_dislike_below

    def heap_threshold_kb(self, env: DistEnv) -> int:
        """``heap_mmap_threshold_kb`` resolved for this rank: ``auto`` (-1) is 1024 when
        the job has more than one rank on this node, else 0 (glibc's dynamic threshold)."""
        if self.heap_mmap_threshold_kb >= 0:
            return self.heap_mmap_threshold_kb
        return 1024 if env.enabled and env.local_world_size > 1 else 0

    def for_refit(self, epochs: int) -> TrainConfig:
        """The second step of ``refit``: these settings for ``epochs`` epochs on training +
        validation edges, with no selection (``select_metric`` ``last``)."""
        return replace(self, refit=True, select_metric="last", epochs=epochs)

    def refitting(self) -> bool:
        """Whether this run trains on training + validation edges (the second step of ``refit``)."""
        return self.refit and self.select_metric == "last"

    def rowwise_tables(self, rows: int) -> bool:
        """Whether tables of ``rows`` users + movies get ``rowwise_adagrad``."""
        return self.table_optimizer == "rowwise_adagrad" or (
            self.table_optimizer == "auto" and rows >= self.sparse_tables_min_rows
        )

    def __post_init__(self) -> None:
        problems = []
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                problems.append(f"'{name}' needs to be positive (got {getattr(self, name)})")
        if not self.num_neighbors or any(n == 0 or n < -1 for n in self.num_neighbors):
            problems.append(f"'num_neighbors' needs positive entries or -1 (got {self.num_neighbors})")
        if self.loss not in ("mse", "weighted_mse"):
            problems.append(f"'loss' needs to be 'mse' or 'weighted_mse' (got {self.loss!r})")
        if self.precision not in PRECISIONS:
            problems.append(f"'precision' needs to be one of {list(PRECISIONS)} (got {self.precision!r})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"'device' needs to be 'auto', 'cpu' or 'cuda' (got {self.device!r})")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            problems.append(f"'steps_per_epoch' needs to be positive (got {self.steps_per_epoch})")
        if self.max_steps is not None and self.max_steps <= 0:
            problems.append(f"'max_steps' needs to be positive (got {self.max_steps})")
        if self.rank_loss_weight < 0:
            problems.append(f"'rank_loss_weight' needs to be non-negative (got {self.rank_loss_weight})")
        if self.rank_dislike_weight < 0:
            problems.append(f"'rank_dislike_weight' needs to be non-negative (got {self.rank_dislike_weight})")
        if self.rank_dislike_below is not None and self.rank_dislike_below > self.relevant_min:
            problems.append(
                f"'rank_dislike_below' needs to be at most 'relevant_min' {self.relevant_min} "
                f"(got {self.rank_dislike_below})"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"'ema_decay' needs to be in [0, 1) (got {self.ema_decay})")
        if self.supervision not in ("exclude_targets", "disjoint", "none"):
            problems.append(
                f"'supervision' needs to be 'exclude_targets', 'disjoint' or 'none' (got {self.supervision!r})"
            )
        if not 0.0 < self.disjoint_ratio < 1.0:
            problems.append(f"'disjoint_ratio' needs to be in (0, 1) (got {self.disjoint_ratio})")
        if self.sampler not in ("auto", "pyg", "torch"):
            problems.append(f"'sampler' needs to be 'auto', 'pyg' or 'torch' (got {self.sampler!r})")
        if self.optimizer not in ("adamw", "adam"):
            problems.append(f"'optimizer' needs to be 'adamw' or 'adam' (got {self.optimizer!r})")
        if self.table_optimizer not in ("auto", "adamw", "rowwise_adagrad"):
            problems.append(
                f"'table_optimizer' needs to be 'auto', 'adamw' or 'rowwise_adagrad' (got {self.table_optimizer!r})"
            )
        if not -1 <= self.heap_mmap_threshold_kb <= 32 * 1024:
            problems.append(
                f"'heap_mmap_threshold_kb' needs to be -1 (auto) or in [0, 32768] (got {self.heap_mmap_threshold_kb})"
            )
        if self.val_memory_mb <= 0:
            problems.append(f"'val_memory_mb' needs to be positive (got {self.val_memory_mb})")
        if self.table_lr <= 0:
            problems.append(f"'table_lr' needs to be positive (got {self.table_lr})")
        if self.sparse_tables_min_rows < 0:
            problems.append(f"'sparse_tables_min_rows' needs to be non-negative (got {self.sparse_tables_min_rows})")
        if self.select_metric not in ("recall", "rmse", "last"):
            problems.append(f"'select_metric' needs to be 'recall', 'rmse' or 'last' (got {self.select_metric!r})")
        if self.refit and self.max_steps is not None:
            problems.append(
                "'refit' needs whole epochs: it repeats the epoch count validation chose "
                f"(got 'max_steps' {self.max_steps})"
            )
        if self.lr <= 0:
            problems.append(f"'lr' needs to be positive (got {self.lr})")
        if self.stop_check_every <= 0:
            problems.append(f"'stop_check_every' needs to be positive (got {self.stop_check_every})")
        if self.collective_timeout_s <= 0:
            problems.append(f"'collective_timeout_s' needs to be positive (got {self.collective_timeout_s})")
        if problems:
            raise ValueError("; ".join(problems))


def precision_dtype(precision: str) -> torch.dtype:
    """The autocast dtype of a ``precision`` name (one of ``PRECISIONS``)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cuda_cannot_exist() -> bool:
    """True when this Linux machine cannot give torch a CUDA device: neither NVIDIA's driver
    library (``libcuda.so.1``) loads nor ROCm's kernel driver (``/dev/kfd``) is there. The
    command line then refuses ``--device cuda`` before torch loads; when either is there (or
    on another OS) torch decides, in ``resolve_device``."""
    if not sys.platform.startswith("linux") or os.path.exists("/dev/kfd"):
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return True
    return False


def device_problems(cfg: TrainConfig, cuda_available: bool) -> list[str]:
    """What ``cfg``'s device and precision ask of a machine with or without CUDA."""
    problems = []
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and cuda_available)
    if want_cuda and not cuda_available:
        problems.append(f"'device' is {cfg.device!r} but no CUDA device is available")
    if cfg.precision == "fp16" and not want_cuda:
        problems.append("'precision' fp16 needs CUDA (CPU autocast supports bf16)")
    return problems


def resolve_device(cfg: TrainConfig, env: DistEnv) -> torch.device:
    import torch

    problems = device_problems(cfg, torch.cuda.is_available())
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and torch.cuda.is_available() and torch.cuda._is_in_bad_fork():
        problems.append(
            "'device' is CUDA but this rank was forked from a process that had initialised CUDA, "
            "where CUDA cannot start again; launch the ranks with torchrun instead of --nproc-per-node"
        )
    if problems:
        raise ValueError("; ".join(problems))
    if want_cuda:
        return torch.device(cfg.device if ":" in cfg.device else f"cuda:{env.local_rank}")
    return torch.device("cpu")
