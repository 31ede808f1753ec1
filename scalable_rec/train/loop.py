"""The training loop, top to bottom in one file.

Single process or torchrun DDP (NCCL on CUDA, gloo on CPU), fp32/bf16/fp16 through one
autocast path (``GradScaler(enabled=fp16)``), ``LinkNeighborLoader`` mini-batches over a
per-rank slice of the training edges, full-neighbourhood validation (RMSE and Recall@10) every
epoch, run the way the test runs, early stopping on ``select_metric``, and checkpoints only from rank 0: ``best.pt`` (model for
scoring) and ``last.pt`` (everything needed to resume exactly, written at epoch ends,
every ``checkpoint_every`` steps, at ``max_steps`` and on SIGTERM/SIGINT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch_geometric.data import HeteroData
from tqdm.auto import tqdm

from scalable_rec.dist import (
    DistEnv,
    EdgeEpochSampler,
    agree_stop,
    all_reduce_sum,
    broadcast_tensors_,
    from_rank0,
    init_distributed,
    inject_fault,
    is_collective_timeout,
)
from scalable_rec.errors import CollectiveError, DivergedError
from scalable_rec.graph.hetero import RATES, REV_RATES, EdgeSplit, RatingGraph
from scalable_rec.heap import fix_mmap_threshold
from scalable_rec.model.recommender import ModelConfig, Recommender, check_model_device
from scalable_rec.train import checkpoint as ckpt
from scalable_rec.train.batches import SupervisionEdges, make_loader, supervision_edges, supervision_stats
from scalable_rec.train.config import TrainConfig, precision_dtype, resolve_device
from scalable_rec.train.feed import Feed
from scalable_rec.train.losses import gather_columns, in_batch_softmax_loss, ranking_positives, rating_class_table
from scalable_rec.train.node_tables import share_tables_on_node
from scalable_rec.train.optim import (
    CombinedOptimizer,
    RowWiseAdagrad,
    all_reduce_sparse_grads_,
    embedding_tables,
    sparse_table_names,
    table_rows,
)
from scalable_rec.train.prefetch import DevicePrefetcher

log = logging.getLogger(__name__)

# Steps between checks of the accumulated training loss for NaN/inf in a single process:
# one device-to-host read per interval instead of one per step (the loop's only host sync
# between epoch ends; docs/gpu.md "Host syncs"). Under DDP the check runs at epoch end on
# the all-reduced sum, so every rank stops together.
FINITE_CHECK_EVERY = 50

# torch-sparse's sampler works and is what CPU-only installs have; PyG's nudge towards
# pyg-lib is not actionable where no pyg-lib wheel exists for the installed torch.
warnings.filterwarnings("ignore", message=".*without a 'pyg-lib' installation is deprecated.*")


@dataclass
class TrainResult:
    model: Recommender
    history: list[dict[str, Any]]
    best_val_rmse: float
    best_val_recall: float
    global_step: int
    stopped_early: bool
    interrupted: bool
    seconds: float
    signal: int | None = None
    """The signal (SIGTERM/SIGINT) that interrupted training; ``None`` for ``max_steps``."""


@dataclass
class Job:
    """What one training run holds: data, model, optimiser and precision, built once."""

    env: DistEnv
    device: torch.device
    cfg: TrainConfig
    run_dir: Path
    config: dict[str, Any]
    model: Recommender
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer | CombinedOptimizer
    scaler: torch.amp.GradScaler
    autocast: torch.autocast
    train_loader: Feed
    """The rank's batches (``make_loader``): a loader and the build that puts a batch on the device."""
    train_sampler: EdgeEpochSampler
    graph: RatingGraph
    split: EdgeSplit
    rating_range: tuple[float, float]
    loader_gen: torch.Generator
    log_q: torch.Tensor
    stores: tuple | None = None
    """The ``(feature_store, graph_store)`` of the training edges when training samples
    from the graph index; validation then encodes layer-wise over them."""
    layer_batch_size: int = 16384
    """Destination nodes per batch of that layer-wise encoding."""
    ema: torch.optim.swa_utils.AveragedModel | None = None
    """The weights' moving average (``ema_decay`` > 0): validated, saved as ``best.pt``."""
    shared_tables: bool = False
    """The row-wise tables are one copy per node, stepped by its first rank
    (``node_tables``): every step ends at a barrier."""
    ema_updates: int = 0
    """Host copy of ``ema.n_averaged``, so an EMA step reads no device tensor."""

    @property
    def scored(self) -> Recommender:
        """The weights validation scores and ``best.pt`` holds: the EMA copy, else the model."""
        return self.model if self.ema is None else self.ema.module


@dataclass
class Progress:
    """Where the run stands; everything in it goes into ``last.pt``."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_rmse: float = math.inf
    best_val_recall: float = math.nan
    best_score: float = math.inf
    bad_epochs: int = 0
    epoch_position: int = 0  # positions of the epoch's global edge order consumed (all ranks)
    stopped_early: bool = False


def train(
    graph: RatingGraph,
    split: EdgeSplit,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    config: dict[str, Any] | None = None,
    data: HeteroData | tuple | None = None,
    rating_range: tuple[float, float] = (0.5, 5.0),
    layer_batch_size: int = 16384,
) -> TrainResult:
    """Trains a recommender on ``split.train`` and early-stops on ``split.val``.

    Under torchrun this joins the process group (and leaves it joined, so the caller can
    evaluate with the same ranks); the caller calls ``shutdown_distributed``.

    Args:
        graph: All rating edges and features.
        split: Edge ids per split. Validation and test edges never take part in
            training message passing.
        model_cfg: Model shape.
        cfg: Training settings.
        run_dir: Where rank 0 writes ``best.pt`` and ``last.pt``.
        config: The resolved config of the whole run, stored in every checkpoint.
        data: The message-passing graph of ``split.train`` edges: ``None`` builds it in
            memory (``graph.hetero_data``); a ``(feature_store, graph_store)`` pair
            (``scalable_rec.graph.store.open_stores(index, "train")``) samples from the
            memory-mapped index instead.
        rating_range: Valid ratings ``(min, max)``; validation clamps predictions to it.
        layer_batch_size: With the stores, validation encodes layer-wise over them in
            batches of this many destination nodes (``scalable_rec.model.layerwise``).
    """
    t0 = time.perf_counter()
    job = build_job(graph, split, model_cfg, cfg, Path(run_dir), config, data, rating_range, layer_batch_size)
    try:
        progress = restore(job) if wants_resume(job) else Progress()
        # a resumed run that had early-stopped stays stopped, unless --patience grew (the
        # same rule as pipeline._stopped_early, which skips the test re-evaluation too)
        stopped_early = progress.stopped_early and progress.bad_epochs >= cfg.patience
        interrupted = False
        with preemption_signals() as stop:
            for epoch in range(progress.epoch, cfg.epochs):
                if stopped_early:  # a resumed run that had already early-stopped
                    break
                progress.epoch = epoch
                stats = train_epoch(job, progress, stop)
                if stats["interrupted"]:
                    interrupted = True
                    save_last(job, progress, progress.epoch, progress.step_in_epoch)
                    break
                stopped_early = validate_and_checkpoint(job, progress, stats)
        load_best(job, progress.epoch)
    except RuntimeError as err:
        if job.env.enabled and is_collective_timeout(err):
            raise CollectiveError(
                f"rank {job.env.rank}: a collective did not complete within 'collective_timeout_s' "
                f"({cfg.collective_timeout_s:g}s) or lost its peer: another rank hung or died ({err})"
            ) from err
        raise
    return TrainResult(
        model=job.model,
        history=progress.history,
        best_val_rmse=progress.best_val_rmse,
        best_val_recall=progress.best_val_recall,
        global_step=progress.global_step,
        stopped_early=stopped_early,
        interrupted=interrupted,
        seconds=time.perf_counter() - t0,
        signal=stop["signal"] if interrupted else None,
    )


def build_job(
    graph: RatingGraph,
    split: EdgeSplit,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    run_dir: Path,
    config: dict[str, Any] | None,
    data: HeteroData | tuple | None = None,
    rating_range: tuple[float, float] = (0.5, 5.0),
    layer_batch_size: int = 16384,
) -> Job:
    """Joins the process group, builds the loaders (message passing over training edges
    only), the model, optimiser and precision, and wraps the model for DDP."""
    env = DistEnv.from_environ()
    heap_kb = cfg.heap_threshold_kb(env)
    if heap_kb and data is not None:  # the mapped stores' path: memory-bound graphs
        fix_mmap_threshold(heap_kb << 10)
    device = resolve_device(cfg, env)
    check_model_device(model_cfg, device)
    init_distributed(env, device, cfg.collective_timeout_s)
    config = config or {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg)}
    torch.manual_seed(cfg.seed + env.rank)  # ranks sample different neighbourhoods

    message_ids, target_ids = supervision_edges(split.train, cfg)
    if data is not None and cfg.supervision == "disjoint":
        raise ValueError(
            "'supervision' disjoint needs the in-memory graph (the mapped index passes messages "
            "over all training edges)"
        )
    edges = SupervisionEdges(graph.src, graph.dst, graph.rating, target_ids)
    # Statistics a chunk at a time, and labels gathered per batch: with the graph index no
    # rank holds a private copy of the supervision edges (they stay in the shared page cache).
    stats = supervision_stats(edges, graph.num_movies)
    if cfg.loss == "weighted_mse":
        edges.class_weight = rating_class_table(stats["class_counts"])
    train_data = graph.hetero_data(message_ids) if data is None else data
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    train_loader, train_sampler = make_loader(
        train_data,
        edges,
        cfg,
        cfg.batch_size,
        env,
        shuffle=True,
        device=device,
        generator=loader_gen,
        exclude_targets=cfg.supervision == "exclude_targets",
    )
    # log of each movie's share of training edges: how often it turns up as an in-batch negative
    log_q = torch.log(stats["movie_counts"].float().clamp(min=1) / target_ids.numel()).to(device)
    if not cfg.logq_correction:
        log_q = torch.zeros_like(log_q)

    model = Recommender(
        graph.num_users, graph.num_movies, graph.movie_x.size(1), model_cfg, rating_mean=stats["rating_mean"]
    ).to(device)
    # Movies without a training edge never get their ID row trained: they are encoded from
    # their features (the unknown-movie input), at validation, test and scoring alike.
    # (Supervision edges are the training edges except with 'disjoint', which is in memory.)
    train_counts = (
        stats["movie_counts"]
        if target_ids is split.train
        else torch.bincount(graph.dst[split.train], minlength=graph.num_movies)
    )
    model.encoder.movie_trained.copy_(train_counts > 0)
    optimizer = make_optimizer(model, cfg)
    ema = None
    if cfg.ema_decay > 0 and cfg.rowwise_tables(table_rows(model)):
        log.info(
            "ema_decay %g: no moving average with row-wise sparse tables (it would be a second dense "
            "copy of every table, updated every step)",
            cfg.ema_decay,
        )
    elif cfg.ema_decay > 0:  # after movie_trained is set: the copy's buffers are never averaged
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=False
        )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    autocast = torch.autocast(device.type, dtype=precision_dtype(cfg.precision), enabled=cfg.precision != "fp32")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    job = Job(
        env=env,
        device=device,
        cfg=cfg,
        run_dir=run_dir,
        config=config,
        model=model,
        ddp_model=model,
        optimizer=optimizer,
        scaler=scaler,
        autocast=autocast,
        train_loader=train_loader,
        train_sampler=train_sampler,
        graph=graph,
        split=split,
        rating_range=rating_range,
        loader_gen=loader_gen,
        log_q=log_q,
        stores=data if isinstance(data, tuple) else None,
        layer_batch_size=layer_batch_size,
        ema=ema,
    )
    if env.enabled:
        # Sparse table gradients are averaged by reduce_table_grads, not DDP's reducer.
        tables = sparse_table_names(model)
        if tables:
            DDP._set_params_and_buffers_to_ignore_for_model(model, tables)
            params = [p for name, p in model.named_parameters() if name in tables]
            broadcast_tensors_(params)
            if device.type == "cpu" and cfg.node_shared_tables:
                job.shared_tables = share_tables_on_node(params, env)
                optimizer.optimizers["tables"].applies = not job.shared_tables or env.local_rank == 0
        job.ddp_model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=_has_unused_parameters(job),
        )
    return job


def wants_resume(job: Job) -> bool:
    """``--resume``, or a torchrun restart (``--max-restarts``) whose run dir has ``last.pt``."""
    if job.cfg.resume:
        return True
    if job.env.restart_count == 0:
        return False
    found = from_rank0(lambda: (job.run_dir / "last.pt").is_file(), job.env, "look for last.pt")
    if job.env.is_main:
        log.warning(
            "torchrun restart %d: %s",
            job.env.restart_count,
            f"resuming from {job.run_dir / 'last.pt'}" if found else "no last.pt yet, starting over",
        )
    return bool(found)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | CombinedOptimizer:
    """AdamW; decoupled decay on dense weights only. Embedding tables (and the bias tables)
    are left out: a decayed table moves every row on every step, including rows no batch
    touched, which pulls rarely seen users and movies towards zero by the step count
    rather than by their data.

    With ``cfg.rowwise_tables`` (``table_optimizer``; by table size with ``auto``) the
    tables are switched to sparse gradients (call this before wrapping the model in DDP,
    which looks for them when it is built) and stepped by ``RowWiseAdagrad``; the rest
    stays on AdamW (``CombinedOptimizer``).
    """
    tables = {id(m.weight) for m in embedding_tables(model)}
    rowwise = cfg.rowwise_tables(table_rows(model))
    dense = [p for p in model.parameters() if p.requires_grad and not (rowwise and id(p) in tables)]
    # On CUDA the fused kernels: with fp16's GradScaler a fused optimiser takes the scale and
    # the found-inf flag as tensors, so the scaler skips its host read of found-inf per step.
    # The CPU keeps the default (foreach) kernels and its bit-for-bit history.
    fused = {"fused": True} if all(p.is_cuda for p in dense) and dense else {}
    if cfg.optimizer == "adam":
        adam = torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    else:
        decay = [p for p in dense if p.ndim >= 2 and id(p) not in tables]
        rest = [p for p in dense if p.ndim < 2 or id(p) in tables]
        adam = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=cfg.lr,
            **fused,
        )
    if not rowwise:
        return adam
    for table in embedding_tables(model):
        table.sparse = True  # F.embedding then returns a sparse gradient of the looked-up rows
    return CombinedOptimizer(
        {
            "dense": adam,
            "tables": RowWiseAdagrad(
                [m.weight for m in embedding_tables(model) if m.weight.requires_grad], lr=cfg.table_lr
            ),
        }
    )


def reduce_table_grads(job: Job) -> None:
    """Under DDP, averages the sparse gradients of row-wise tables over the ranks (DDP's
    reducer leaves them out; ``scalable_rec.train.optim``)."""
    if job.env.enabled and isinstance(job.optimizer, CombinedOptimizer):
        all_reduce_sparse_grads_(
            [p for g in job.optimizer.optimizers["tables"].param_groups for p in g["params"]], job.env.world_size
        )


def restore(job: Job) -> Progress:
    """Loads ``last.pt``: weights, optimiser, scaler, progress and this rank's RNG streams.

    Only rank 0 reads the file; the others receive it (no shared file system needed on
    one node). A checkpoint from another world size continues the interrupted epoch with
    its remaining edges re-dealt over the current ranks (``EdgeEpochSampler``); ranks
    that existed then get their RNG streams back, new ranks seed theirs from
    ``(seed, rank, global_step)``.
    """
    env = job.env
    state = from_rank0(lambda: ckpt.load(job.run_dir / "last.pt", map_location="cpu"), env, "read last.pt")
    ckpt.check_compatible(state["config"], job.config)
    job.model.load_state_dict(state["model"])
    job.optimizer.load_state_dict(state["optimizer"])
    job.scaler.load_state_dict(state["scaler"])
    if job.ema is not None:
        job.ema.load_state_dict(state["ema"])
        job.ema_updates = int(job.ema.n_averaged)  # once per resume, not per step
    saved_world = int(state.get("world_size", len(state["rng"])))
    position = state.get("epoch_position", state["step_in_epoch"] * job.cfg.batch_size * saved_world)
    if env.rank < len(state["rng"]):
        ckpt.set_rng_state(state["rng"][env.rank], job.loader_gen)
    else:
        torch.manual_seed(job.cfg.seed + env.rank + 1_000_003 * state["global_step"])
        job.loader_gen.manual_seed(job.cfg.seed + 1_000_003 * state["global_step"])
    if env.is_main:
        log.info("resumed from %s at epoch %d step %d", job.run_dir / "last.pt", state["epoch"], state["step_in_epoch"])
        if saved_world != env.world_size:
            log.warning(
                "resuming with world size %d (checkpoint: %d): the rest of epoch %d (from position "
                "%d of its edge order) is re-dealt over %d rank(s)",
                env.world_size,
                saved_world,
                state["epoch"],
                position,
                env.world_size,
            )
    return Progress(
        epoch=state["epoch"],
        step_in_epoch=state["step_in_epoch"],
        global_step=state["global_step"],
        history=state["history"],
        best_val_rmse=state["best_val_rmse"],
        best_val_recall=state.get("best_val_recall", math.nan),
        best_score=state.get("best_score", state["best_val_rmse"]),
        bad_epochs=state["bad_epochs"],
        epoch_position=position,
        stopped_early=bool(state.get("stopped_early", False)),
    )


@contextlib.contextmanager
def preemption_signals():
    """Preemption (SIGTERM from a scheduler, Ctrl-C) sets a flag: the loop finishes the step,
    saves and stops. Only the main thread may install handlers; elsewhere the caller
    handles signals."""
    stop: dict[str, int | None] = {"signal": None}
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, lambda signum, _frame: stop.update(signal=signum))
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def training_loss(job: Job, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rating loss (+ the retrieval head's in-batch softmax) in fp32 whatever the autocast
    dtype; pads have weight 0. Returns the loss, the squared errors and the weights.

    Both terms are means over the *global* batch: each rank's sum is divided by the
    all-reduced count of rated rows (and of relevant rows) and multiplied by the world
    size, which DDP's gradient averaging divides back out. Ranks then hold different
    numbers of pads and positives and still optimise the single-process objective.
    """
    rating, weight = batch[RATES].edge_label.unbind(-1)
    with job.autocast:
        pred, rank = job.ddp_model(batch)
    se = (pred.float() - rating) ** 2
    positive = ranking_positives(rating, weight, job.cfg.relevant_min)
    counts = torch.stack([weight.bool().sum(), positive.sum()]).float()
    if job.env.enabled:
        # Two scalars per step, queued on the device like DDP's own all-reduces: the host
        # does not wait for it (no host sync).
        torch.distributed.all_reduce(counts)
    counts = counts.clamp(min=1) / job.env.world_size
    loss = (se * weight).sum() / counts[0]
    if rank is not None and job.cfg.rank_loss_weight > 0:
        ru, rm = rank[0].float(), rank[1].float()
        movies = batch["movie"].n_id[batch[RATES].edge_label_index[1]]
        # pads (weight 0) become column id -1: not a negative of any row
        rm_all, movies_all, offset = gather_columns(rm, torch.where(weight > 0, movies, -1), job.env)
        dislike = None
        if job.cfg.rank_dislike_weight > 0:
            dislike = job.cfg.rank_dislike_weight * ((weight > 0) & (rating < job.cfg.dislike_below())).float()
        loss = loss + job.cfg.rank_loss_weight * in_batch_softmax_loss(
            ru, rm_all, movies, movies_all, job.log_q, positive, offset, denominator=counts[1], dislike=dislike
        )
        if job.cfg.rank_id_l2 > 0:  # the rows the forward looked up (none an ID dropout hid)
            loss = loss + job.cfg.rank_id_l2 * ((rank[2] + rank[3]) * weight.bool()).sum() / counts[0]
    return loss, se, weight


def train_step(job: Job, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on ``batch`` (already on the device): loss, backward, the tables'
    sparse gradients averaged, the step, the EMA. Returns the squared errors and weights.

    No host sync on CUDA with fp32/bf16 and dense tables, nor with fp16 (the fused
    optimiser takes the scaler's found-inf flag on the device). The exceptions are named
    where they happen: fp16 with row-wise tables (the scaler reads found-inf) and the
    node-shared tables' barrier (CPU only).
    """
    loss, se, weight = training_loss(job, batch)
    job.optimizer.zero_grad(set_to_none=True)
    job.scaler.scale(loss).backward()
    reduce_table_grads(job)
    # fp16 with row-wise tables (CombinedOptimizer is not a fused optimiser): the scaler reads
    # its found-inf flag on the host, a sync point. A no-op without fp16.
    job.scaler.step(job.optimizer)
    job.scaler.update()
    if job.shared_tables:  # nobody reads a table the node's first rank is still stepping
        torch.distributed.barrier()
    if job.ema is not None:
        update_ema(job)
    return se, weight


@torch.no_grad()
def update_ema(job: Job) -> None:
    """``AveragedModel.update_parameters`` for the EMA, without its two host reads of
    ``n_averaged`` per step (a sync point on CUDA): the count is mirrored on the host
    (``Job.ema_updates``). The same arithmetic (copy on the first update, then
    ``lerp(avg, weight, 1 - decay)``), so the averages are bit-identical to torch's."""
    ema = job.ema
    averaged, current = list(ema.module.parameters()), list(job.model.parameters())
    if job.ema_updates == 0:
        for a, c in zip(averaged, current):
            a.copy_(c)
    else:
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point() or a.is_complex()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1 - job.cfg.ema_decay)
        for a, c in zip(averaged, current):
            if not (a.is_floating_point() or a.is_complex()):
                a.copy_(a * job.cfg.ema_decay + c * (1 - job.cfg.ema_decay))
    for b_avg, b_model in zip(ema.module.buffers(), job.model.buffers()):  # use_buffers=False: kept in step
        b_avg.copy_(b_model)
    ema.n_averaged += 1
    job.ema_updates += 1


def train_epoch(job: Job, progress: Progress, stop: dict[str, int | None]) -> dict[str, Any]:
    """One pass over this rank's slice (from ``progress.step_in_epoch`` on a resume).

    Stops early, with ``interrupted`` set, on a preemption signal or at ``max_steps``.
    """
    cfg, env = job.cfg, job.env
    job.ddp_model.train()
    job.train_sampler.set_epoch(progress.epoch, position=progress.epoch_position)
    # Sums stay on the device and are read once, at the epoch's end; the count in int64
    # (a float32 count is no longer exact past 2**24 labelled edges).
    sse = torch.zeros((), device=job.device)
    count = torch.zeros((), dtype=torch.long, device=job.device)
    load_s = compute_s = 0.0
    t_epoch = time.perf_counter()
    full_epoch = len(job.train_loader) + progress.step_in_epoch  # the sampler skips resumed steps
    steps_this_epoch = min(full_epoch, cfg.steps_per_epoch or full_epoch)
    bar = tqdm(
        total=steps_this_epoch,
        initial=progress.step_in_epoch,
        desc=f"epoch {progress.epoch}",
        disable=not (cfg.progress and env.is_main),
        leave=False,
    )
    interrupted = False
    # On CUDA each batch is copied and built on a side stream while the last step runs
    it = iter(DevicePrefetcher(job.train_loader, job.device))
    while progress.step_in_epoch < steps_this_epoch:
        t_load = time.perf_counter()
        batch = next(it, None)
        if batch is None:
            break
        t_step = time.perf_counter()
        load_s += t_step - t_load
        se, weight = train_step(job, batch)
        progress.step_in_epoch += 1
        progress.global_step += 1
        progress.epoch_position += cfg.batch_size * env.world_size
        sse += (se.detach() * weight.bool()).sum()
        count += weight.bool().sum()
        # Without a sync the host runs ahead of the device: compute_s is the time the host
        # spent queuing steps; the device's backlog is drained at the epoch end's read,
        # which is counted as compute too.
        compute_s += time.perf_counter() - t_step
        bar.update(1)
        inject_fault(env, progress.global_step)
        if not env.enabled and progress.step_in_epoch % FINITE_CHECK_EVERY == 0:
            # sync point: reads the running loss sum every FINITE_CHECK_EVERY steps
            check_finite("training loss", float(sse), progress)
        if should_stop(job, progress, stop):
            interrupted = True
            break
        if cfg.checkpoint_every and progress.global_step % cfg.checkpoint_every == 0:
            save_last(job, progress, progress.epoch, progress.step_in_epoch)
    bar.close()
    t_sync = time.perf_counter()
    sse_total, count_total = float(sse), float(count)  # sync point: the epoch's sums, once per epoch
    compute_s += time.perf_counter() - t_sync
    return {
        "sse": sse_total,
        "count": count_total,
        "load_s": load_s,
        "compute_s": compute_s,
        "started": t_epoch,
        "interrupted": interrupted,
    }


def should_stop(job: Job, progress: Progress, stop: dict[str, int | None]) -> bool:
    """``max_steps`` reached (the same step on every rank), or a signal on any rank, agreed
    every ``stop_check_every`` steps so that all ranks leave at the same step."""
    cfg = job.cfg
    if cfg.max_steps and progress.global_step >= cfg.max_steps:
        return True
    if job.env.enabled and progress.global_step % cfg.stop_check_every:
        return False
    # Over gloo on CPU tensors (the control group beside NCCL): the ranks' host threads
    # meet, but nothing waits for the device.
    agreed = agree_stop(stop["signal"] or 0)
    if agreed and stop["signal"] is None:
        stop["signal"] = agreed  # another rank was signalled: leave with its exit code (128 + signal)
    return bool(agreed)


def validate(job: Job) -> dict[str, float]:
    """Validation as the test runs: full neighbourhoods over the training edges, RMSE on
    every validation edge, Recall/NDCG@10 on the relevant ones (training edges masked).

    Under torchrun the ranks split the edges and users and reduce the sums, so every rank
    gets the same numbers (every rank calls this).
    """
    # The test's own evaluation (score/), so validation and test run the same inference.
    # Imported at call time: score/ builds on train/, not the other way round.
    from scalable_rec.model.evaluate import evaluate_edges
    from scalable_rec.model.layerwise import encode_layerwise
    from scalable_rec.model.topk import RatedIndex

    z = seen = None
    if job.stores is not None:
        # Layer-wise over the mapped training CSC, masks from its per-user rows: no in-memory
        # copy of the training graph (encode_all's adjacency and activations) per rank.
        job.scored.eval()
        feature_store, graph_store = job.stores
        z = encode_layerwise(job.scored, feature_store, graph_store, batch_size=job.layer_batch_size)
        rev_row, rev_colptr = graph_store.get_edge_index(REV_RATES, layout="csc")
        seen = RatedIndex(rowptr=rev_colptr, col=rev_row)
    out = evaluate_edges(
        job.scored,
        job.graph,
        job.split.train,
        job.split.val,
        k=10,
        memory_mb=job.cfg.val_memory_mb,
        rating_min=job.rating_range[0],
        rating_max=job.rating_range[1],
        relevant_min=job.cfg.relevant_min,
        z=z,
        seen=seen,
        env=job.env,
    )
    return {
        "rmse": out["rmse"],
        "mae": out["mae"],
        "recall": out["model"]["recall@10"],
        "ndcg": out["model"]["ndcg@10"],
    }


def selection_score(val: dict[str, float], metric: str) -> float:
    """Lower is better; a metric that could not be computed (no relevant validation
    edge) never counts as an improvement."""
    score = val["rmse"] if metric == "rmse" else -val["recall"]
    return score if math.isfinite(score) else math.inf


def validate_and_checkpoint(job: Job, progress: Progress, stats: dict[str, Any]) -> bool:
    """Validation (``validate``), history, ``best.pt``/``last.pt`` (rank 0 writes) and the
    early-stop decision on ``select_metric``; returns whether to stop."""
    env = job.env
    sse_t, count_t = all_reduce_sum([stats["sse"], stats["count"]], job.device)
    check_finite("training loss", sse_t, progress)
    if job.split.val.numel():
        val = validate(job)
        check_finite("validation RMSE", val["rmse"], progress)
    else:  # a refit on every labelled edge (select_metric 'last'): nothing left to validate on
        val = dict.fromkeys(("rmse", "mae", "recall", "ndcg"), math.nan)
    busy = max(stats["load_s"] + stats["compute_s"], 1e-9)
    record = {
        "epoch": progress.epoch,
        "train_rmse": math.sqrt(sse_t / max(count_t, 1)),
        "val_rmse": val["rmse"],
        "val_mae": val["mae"],
        "val_recall@10": val["recall"],
        "val_ndcg@10": val["ndcg"],
        "seconds": time.perf_counter() - stats["started"],
        "steps": progress.step_in_epoch,
        "edges_per_s": count_t / busy,
        "loader_share": stats["load_s"] / busy,
    }
    progress.history.append(record)
    if env.is_main:
        log.info(
            "epoch %d: train rmse %.4f  val rmse %.4f  val recall@10 %.4f  (%.1fs, %.0f edges/s, loader %.0f%%)",
            progress.epoch,
            record["train_rmse"],
            val["rmse"],
            val["recall"],
            record["seconds"],
            record["edges_per_s"],
            100 * record["loader_share"],
        )
    score = selection_score(val, job.cfg.select_metric)
    if job.cfg.select_metric == "last" or score < progress.best_score - 1e-5:
        progress.best_score, progress.bad_epochs = score, 0
        progress.best_val_rmse, progress.best_val_recall = val["rmse"], val["recall"]
        if env.is_main:
            ckpt.save_atomic(
                {
                    "model": job.scored.state_dict(),
                    "config": job.config,
                    "epoch": progress.epoch,
                    "val_rmse": val["rmse"],
                    "val_recall@10": val["recall"],
                    "select_metric": job.cfg.select_metric,
                },
                job.run_dir / "best.pt",
            )
    else:
        progress.bad_epochs += 1
    # Decided before last.pt is written, so resuming a finished run does not train on.
    progress.stopped_early = progress.bad_epochs >= job.cfg.patience
    progress.epoch_position = 0
    save_last(job, progress, progress.epoch + 1, 0)
    progress.step_in_epoch = 0
    if progress.stopped_early:
        if env.is_main:
            log.info(
                "early stop: no better val %s for %d epochs (best val rmse %.4f, recall@10 %.4f)",
                job.cfg.select_metric,
                progress.bad_epochs,
                progress.best_val_rmse,
                progress.best_val_recall,
            )
        return True
    return False


def check_finite(what: str, value: float, progress: Progress) -> None:
    """Stops a diverged run: a NaN/inf loss would otherwise train on and save NaN weights."""
    if not math.isfinite(value):
        raise DivergedError(
            f"Training diverged: {what} is {value} at epoch {progress.epoch} step {progress.global_step}; "
            "lower --lr, check the movie features, or resume from an earlier last.pt"
        )


def save_last(job: Job, progress: Progress, epoch: int, step_in_epoch: int) -> None:
    """``last.pt``: everything needed to resume exactly. Every rank's RNG state goes into
    rank 0's file (gathered), so resume is exact per rank."""
    states = [ckpt.rng_state(job.loader_gen)]
    if job.env.enabled:
        states = [None] * job.env.world_size
        torch.distributed.all_gather_object(states, ckpt.rng_state(job.loader_gen))
    if job.env.is_main:
        ckpt.save_atomic(
            {
                "model": job.model.state_dict(),
                "optimizer": job.optimizer.state_dict(),
                "scaler": job.scaler.state_dict(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": progress.global_step,
                "history": progress.history,
                "best_val_rmse": progress.best_val_rmse,
                "best_val_recall": progress.best_val_recall,
                "best_score": progress.best_score,
                "bad_epochs": progress.bad_epochs,
                "rng": states,
                **({"ema": job.ema.state_dict()} if job.ema is not None else {}),
                "config": job.config,
                "world_size": job.env.world_size,
                "epoch_position": progress.epoch_position,
                "stopped_early": progress.stopped_early,
            },
            job.run_dir / "last.pt",
        )


def load_best(job: Job, epoch: int) -> None:
    """The best weights (or the current ones if no epoch finished) are what gets scored.

    Rank 0 alone looks at ``best.pt`` (writing it from the current weights when no epoch
    finished) and sends its weights to the other ranks, so they never read a file only
    rank 0 may see.
    """
    best = job.run_dir / "best.pt"

    def read_or_write() -> bool:
        if best.is_file():
            job.model.load_state_dict(ckpt.load(best, map_location=job.device)["model"])
            return True
        ckpt.save_atomic(
            {"model": job.scored.state_dict(), "config": job.config, "epoch": epoch, "val_rmse": None}, best
        )
        return False

    if from_rank0(read_or_write, job.env, "load best.pt"):
        broadcast_tensors_(list(job.model.state_dict().values()))
    elif job.ema is not None:  # every rank holds the same average: what best.pt now holds
        job.model.load_state_dict(job.ema.module.state_dict())


def _has_unused_parameters(job: Job) -> bool:
    """One probe forward/backward of the real training loss: does any parameter get no
    gradient (an unused edge type, or the retrieval head with ``rank_loss_weight`` 0)?

    Runs under a forked RNG on a fresh iterator so the real run's random streams are
    unchanged. Also initialises lazy modules before DDP wraps the model.
    """
    model, device = job.model, job.device
    gen_state = job.loader_gen.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batch = next(iter(job.train_loader)).to(device)
        loss, _, _ = training_loss(job, batch)
        loss.backward()
    job.loader_gen.set_state(gen_state)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return bool(unused)
