"""One-node DDP without ``torchrun``: ``--nproc-per-node N`` forks the ranks.

``torchrun`` starts every rank as a fresh interpreter, so each rank imports torch, PyG
(which pulls in ``torch._dynamo`` and, through its LLM datasets, ``transformers``) and the
package on its own: about 270 MiB of private memory per rank before it holds any data
(README, "Graphs larger than memory"). Here the command's own process imports all of that
once, freezes the garbage collector's view of those objects (``gc.freeze``: a collection in
a rank then does not write to their pages) and forks the ranks, which share the imported
pages copy-on-write with it and with each other.

The ranks are started and watched by torch's elastic agent (``elastic_launch``, the engine
behind ``torchrun``) with ``start_method="fork"``, as ``accelerate``'s notebook launcher and
Lightning's ``ddp_fork`` do: rendezvous on a free local port, the same environment as
under ``torchrun`` (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``TORCHELASTIC_RESTART_COUNT``
...), restarts with ``--max-restarts`` (a restarted rank resumes from ``last.pt``), and
SIGTERM/SIGINT forwarded to every rank, which stop at the same step and write
``last.pt``. Each rank runs the unchanged command line, so everything that works under
``torchrun`` works here. One node only; across nodes, use ``torchrun``.

CUDA must not be initialised before a fork: this process only imports, it never touches a
device (``launch`` refuses to fork otherwise); each rank picks ``cuda:LOCAL_RANK`` itself.
"""
from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import uuid
from typing import Callable, Sequence

log = logging.getLogger(__name__)

# What a rank imports on its way through train/score: imported here, before the fork, so
# the ranks share it instead of each importing its own copy.
PRELOAD = ("torch", "torch_geometric", "torch_geometric.loader", "torch.distributed",
           "scalable_rec.pipeline", "scalable_rec.train.loop", "scalable_rec.graph.store",
           "scalable_rec.graph.index", "scalable_rec.score.layerwise", "scalable_rec.sink.parquet")

# Set in the ranks' environment (inherited through the fork): this process launched them.
LAUNCHED_ENV = "SCALABLE_REC_LAUNCHED"

# Seconds a rank gets to write last.pt after the forwarded SIGTERM before it is killed.
SHUTDOWN_TIMEOUT_S = 120


def _rank_main(argv: list[str]) -> int:
    from scalable_rec.cli import main

    code = main(argv)
    if code:
        # A failed or signalled rank leaves now, with its status, as a torchrun worker
        # would: the agent's fork wrapper would otherwise wait for the agent to collect a
        # return value, which an agent shutting down after a signal never does.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def preload() -> None:
    """Imports what every rank needs and freezes those objects out of the collector."""
    for name in PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()


def _quiet_agent() -> None:
    import torch.distributed.elastic.agent.server.api  # noqa: F401 (creates its loggers)
    import torch.distributed.elastic.multiprocessing.api  # noqa: F401

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch(argv: Sequence[str], nproc: int, max_restarts: int = 0,
           entrypoint: Callable[[list[str]], int] = _rank_main) -> int:
    """Runs ``scalable-rec ARGV`` (or ``entrypoint(argv)``) as ``nproc`` DDP ranks forked
    from this process; returns the exit status: the largest of the ranks', ``128 + signal`` when this process was
    signalled (the ranks got the signal too and wrote ``last.pt``), 1 when a rank failed
    without one (its error is in its output above)."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError(f"'nproc_per_node' needs to be positive (got {nproc})")
    # torch.cuda.is_available() in this process (an import may ask) would otherwise start
    # the CUDA driver, after which no forked rank can use CUDA; NVML answers it without that.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    preload()
    if not log.isEnabledFor(logging.DEBUG):  # the ranks log their own errors; the agent's
        _quiet_agent()                       # traceback of a rank's exit adds nothing
    os.environ[LAUNCHED_ENV] = "1"
    if torch.cuda.is_initialized():  # a forked rank could not use CUDA
        raise RuntimeError("CUDA was initialised before forking the ranks")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"scalable-rec-{uuid.uuid4()}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=max_restarts,
                          start_method="fork", monitor_interval=0.1, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    try:
        codes = elastic_launch(config, entrypoint)(list(argv))
    except SignalException as err:
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        exit_codes = [f.exitcode for f in err.failures.values()]
        log.error("%d of %d ranks failed (exit codes %s)", len(exit_codes), nproc, exit_codes)
        return max((c for c in exit_codes if c > 0), default=1)
    return max(int(c or 0) for c in codes.values())


__all__ = ["LAUNCHED_ENV", "PRELOAD", "launch", "preload"]
