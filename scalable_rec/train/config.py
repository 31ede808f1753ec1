"""Training settings (``TrainConfig``) and the device and precision they resolve to."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from scalable_rec.train.distributed import DistEnv


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Optimisation and input-pipeline settings.

    Args:
        epochs: Maximum epochs (default 40); early stopping may end sooner.
        batch_size: Labelled edges per step and rank (default 2048).
        num_neighbors: Neighbours sampled per hop, one entry per GraphSAGE layer;
            ``-1`` takes all.
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay of the dense weights (linear layers);
            embedding tables and biases are not decayed, so a row that no batch touches
            stays where it is.
        supervision: How a batch's supervision edges are kept out of its own message
            passing: ``exclude_targets`` (each batch's target edges and their reverse edges
            are removed from that batch's sampled subgraph, as DGL's ``exclude="reverse_id"``),
            ``disjoint`` (a fixed, seeded ``disjoint_ratio`` share of the training edges
            supervises, the rest carries messages, as PyG's ``disjoint_train_ratio``) or
            ``none`` (targets stay in their own subgraph: train/serve skew).
        disjoint_ratio: Share of training edges used for supervision with ``disjoint``.
        relevant_min: Ratings at or above this are relevant: the positives of the retrieval
            head's in-batch softmax and of Recall/NDCG evaluation (default 4.0).
        optimizer: ``adamw`` (decoupled decay, tables and biases undecayed) or ``adam``
            (the former coupled L2 on every parameter; kept for the ablation table).
        table_optimizer: How the user/movie embedding and bias tables are trained:
            ``adamw`` (dense gradients, two moments per element: four times the tables'
            size per rank), ``rowwise_adagrad`` (sparse gradients of the batch's rows, one
            state float per row; ``scalable_rec.train.optim``) or ``auto`` (row-wise from
            ``sparse_tables_min_rows`` users + movies on, AdamW below).
        table_lr: Learning rate of ``rowwise_adagrad`` on the tables.
        sparse_tables_min_rows: Crossover of ``table_optimizer`` ``auto``, in users + movies.
        val_memory_mb: Budget of one block of validation ranking scores (users × movies ×
            4 bytes; the chunking of ``evaluate_edges``): bounds validation's working memory
            beside the embeddings (default 32).
        node_shared_tables: Under DDP on CPU with row-wise tables, the ranks of one machine
            share one copy of the tables in shared memory (``/dev/shm``), stepped by the
            machine's first rank (``scalable_rec.train.node_tables``); each rank otherwise
            holds its own replica. Default on; off, or without room in ``/dev/shm``, every
            rank keeps its copy. Bit-identical results either way.
        heap_mmap_threshold_kb: With a value > 0, fix glibc's mmap threshold at this many
            KiB when training over the mapped graph index starts, so that freed tensors of
            that size and more go back to the kernel instead of staying in the heap
            (``scalable_rec.heap``; a process-wide setting); 0 leaves glibc's dynamic
            threshold. Default -1 (``auto``): 1024 when more than one rank of the job shares
            this node (``LOCAL_WORLD_SIZE`` > 1: torchrun or ``--nproc-per-node``), 0 for a
            rank alone on its node. Sharing a node, 1024 keeps two ranks within 1.3× one
            rank's memory at 25M edges, but every new step tensor then costs fresh pages (with
            the ``scalable-rec`` command's transparent huge pages, 0.72–0.76× the in-memory
            path's training edges/s); alone, the dynamic threshold keeps 0.85–0.93× (README
            "Graphs larger than memory"). The in-memory path never sets it.
        select_metric: Validation metric that picks ``best.pt`` and drives early stopping:
            ``recall`` (Recall@10 of the retrieval head, what a top-K list shows) or
            ``rmse``. Validation runs like the test: full neighbourhoods over the
            training edges. ``last``: no selection and no early stopping; ``best.pt`` holds
            the weights after the last of ``epochs`` (the second step of ``refit``).
            Without validation edges nothing is validated.
        refit: Once validation has chosen the epoch count, train again from scratch on the
            training *and* validation edges for that many epochs; that refit is the run's
            model (tested, scored), and the selecting run is kept in ``<run_dir>/select``
            (``scalable-rec train --refit``: both steps in one command). With
            ``select_metric`` ``last`` only the second step runs, for ``epochs``. The test
            edges stay held out either way. This is the protocol of ``scripts/quality.py``'s
            refit row and of its baselines (refit on training + validation edges once
            validation chose their hyper-parameter). Default off: it trains twice.
        rank_loss_weight: Weight of the retrieval head's in-batch sampled-softmax loss
            (logQ-corrected for the popularity of in-batch negatives) added to the rating
            loss; ignored when the model has no retrieval head.
        logq_correction: Subtract each in-batch negative's log sampling probability (its share
            of the supervision edges) from its logit (logQ correction), so the retrieval logits
            estimate a full-catalog softmax; ``False`` leaves the in-batch softmax as it is,
            which discounts popular movies.
        rank_id_l2: L2 penalty on the retrieval head's own user and movie vectors, over the
            rows a batch uses (``rank_id_l2 × mean(‖p_u‖² + ‖q_m‖²)`` over its labelled edges):
            rows are regularised as often as they are trained, unseen rows are not decayed.
            Default 0.05, chosen on ml-latest-small's validation Recall@10 over seeds 0-2
            (0.01 no gain, 0.1 less, 0.3 and 1.0 shrink the vectors away; README "Ranking
            vectors' L2"). 0 turns it off.
        ema_decay: With a value in (0, 1), an exponential moving average of the weights
            (``torch.optim.swa_utils`` EMA, updated after every optimiser step) is what
            validation scores, what ``best.pt`` holds and what training returns; training steps
            continue from the raw weights. 0 turns it off. Default 0.99 (a horizon of about
            100 steps): chosen on ml-latest-small's validation (seed 0), where it raised
            validation Recall@10 at ``best.pt`` from 0.178 to 0.185 and lowered validation
            RMSE there from 0.872 to 0.860 (ablation row ``no-ema``). Not kept with
            row-wise sparse tables (``rowwise_tables``: large graphs), where it would be a
            second dense copy of every table, passed over after every step.
        loss: ``mse`` (optimises RMSE directly) or ``weighted_mse`` (each half-star
            rating class weighted by its inverse training frequency, mean weight 1).
        patience: Epochs without a better validation score (``select_metric``) before
            stopping (default 6: with ``rank_id_l2`` validation Recall@10 can stall for a
            few epochs and then rise again).
        precision: ``fp32``, ``bf16`` (CPU or CUDA) or ``fp16`` (CUDA, with GradScaler).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        sampler: Neighbour sampler: ``pyg`` (PyG's ``LinkNeighborLoader`` over pyg-lib or
            torch-sparse, on the CPU), ``torch`` (``scalable_rec.train.sampler``: plain torch
            on the training device, CUDA or CPU) or ``auto`` (``torch`` on a CUDA device the
            graph fits, ``pyg`` otherwise; docs/gpu.md "GPU sampler").
        num_workers: Sampler worker processes per rank; ``-1`` picks 0 on CPU (the
            sampler competes with the model for the same cores) and up to 4 on CUDA.
        seed: Seed of model init, shuffling and neighbour sampling.
        steps_per_epoch: End each epoch after this many steps (a random sample of the
            epoch's shuffled slice; validation still runs). ``None``: a full pass.
        max_steps: Stop after this many optimiser steps in total (``last.pt`` is written;
            ``resume`` continues). ``None``: no cap.
        checkpoint_every: Also write ``last.pt`` every N steps (0: at epoch ends only).
        resume: Continue from ``<run_dir>/last.pt``. Under torchrun a restarted job
            (``--max-restarts``) resumes from an existing ``last.pt`` without it.
        progress: Show progress bars (rank 0 only).
        stop_check_every: Under torchrun, agree every N steps (one all-reduce of a flag)
            whether any rank got SIGTERM/SIGINT, so all ranks stop at the same step and
            write ``last.pt`` together (default 1: a signal stops within one step).
        collective_timeout_s: Seconds a collective may wait for the other ranks before
            it fails with an error naming this flag (a hung or dead rank; default 1800).
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

    def heap_threshold_kb(self, env: DistEnv) -> int:
        """``heap_mmap_threshold_kb`` resolved for this rank: ``auto`` (-1) is 1024 when
        the job has more than one rank on this node, else 0 (glibc's dynamic threshold)."""
        if self.heap_mmap_threshold_kb >= 0:
            return self.heap_mmap_threshold_kb
        return 1024 if env.enabled and env.local_world_size > 1 else 0

    def for_refit(self, epochs: int) -> "TrainConfig":
        """The second step of ``refit``: these settings for ``epochs`` epochs on training +
        validation edges, with no selection (``select_metric`` ``last``)."""
        return replace(self, refit=True, select_metric="last", epochs=epochs)

    def refitting(self) -> bool:
        """Whether this run trains on training + validation edges (the second step of ``refit``)."""
        return self.refit and self.select_metric == "last"

    def rowwise_tables(self, rows: int) -> bool:
        """Whether tables of ``rows`` users + movies get ``rowwise_adagrad``."""
        return self.table_optimizer == "rowwise_adagrad" or (
            self.table_optimizer == "auto" and rows >= self.sparse_tables_min_rows)

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
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"'ema_decay' needs to be in [0, 1) (got {self.ema_decay})")
        if self.supervision not in ("exclude_targets", "disjoint", "none"):
            problems.append(f"'supervision' needs to be 'exclude_targets', 'disjoint' or 'none' "
                            f"(got {self.supervision!r})")
        if not 0.0 < self.disjoint_ratio < 1.0:
            problems.append(f"'disjoint_ratio' needs to be in (0, 1) (got {self.disjoint_ratio})")
        if self.sampler not in ("auto", "pyg", "torch"):
            problems.append(f"'sampler' needs to be 'auto', 'pyg' or 'torch' (got {self.sampler!r})")
        if self.optimizer not in ("adamw", "adam"):
            problems.append(f"'optimizer' needs to be 'adamw' or 'adam' (got {self.optimizer!r})")
        if self.table_optimizer not in ("auto", "adamw", "rowwise_adagrad"):
            problems.append(f"'table_optimizer' needs to be 'auto', 'adamw' or 'rowwise_adagrad' "
                            f"(got {self.table_optimizer!r})")
        if not -1 <= self.heap_mmap_threshold_kb <= 32 * 1024:
            problems.append(f"'heap_mmap_threshold_kb' needs to be -1 (auto) or in [0, 32768] "
                            f"(got {self.heap_mmap_threshold_kb})")
        if self.val_memory_mb <= 0:
            problems.append(f"'val_memory_mb' needs to be positive (got {self.val_memory_mb})")
        if self.table_lr <= 0:
            problems.append(f"'table_lr' needs to be positive (got {self.table_lr})")
        if self.sparse_tables_min_rows < 0:
            problems.append(f"'sparse_tables_min_rows' needs to be non-negative (got {self.sparse_tables_min_rows})")
        if self.select_metric not in ("recall", "rmse", "last"):
            problems.append(f"'select_metric' needs to be 'recall', 'rmse' or 'last' (got {self.select_metric!r})")
        if self.refit and self.max_steps is not None:
            problems.append("'refit' needs whole epochs: it repeats the epoch count validation chose "
                            f"(got 'max_steps' {self.max_steps})")
        if self.lr <= 0:
            problems.append(f"'lr' needs to be positive (got {self.lr})")
        if self.stop_check_every <= 0:
            problems.append(f"'stop_check_every' needs to be positive (got {self.stop_check_every})")
        if self.collective_timeout_s <= 0:
            problems.append(f"'collective_timeout_s' needs to be positive (got {self.collective_timeout_s})")
        if problems:
            raise ValueError("; ".join(problems))


def resolve_device(cfg: TrainConfig, env: DistEnv) -> torch.device:
    problems = []
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        problems.append(f"'device' is {cfg.device!r} but no CUDA device is available")
    if cfg.precision == "fp16" and not want_cuda:
        problems.append("'precision' fp16 needs CUDA (CPU autocast supports bf16)")
    if problems:
        raise ValueError("; ".join(problems))
    if want_cuda:
        return torch.device(cfg.device if ":" in cfg.device else f"cuda:{env.local_rank}")
    return torch.device("cpu")
