"""One-node DDP without ``torchrun``: ``--nproc-per-node N`` starts the ranks itself.

``torchrun`` starts every rank as a fresh interpreter, so each rank imports torch, PyG
(which pulls in ``torch._dynamo`` and, through its LLM datasets, ``transformers``) and the
package on its own: about 270 MiB of private memory per rank before it holds any data
(README, "Graphs larger than memory"). Here one process, a forkserver, imports all of that
once, freezes the garbage collector's view of those objects (``gc.freeze``: a collection in
a rank then does not write to their pages) and forks the ranks, which share the imported
pages copy-on-write with it and with each other (``forkserver_preload``).

The ranks are forked from the forkserver, never from this process: this process runs
torch's elastic agent, whose rendezvous store, and pyarrow's allocator, keep threads alive
here, and a fork copies their locks in whatever state they are. The forkserver is a fresh
interpreter that only imports and forks; it runs no other thread (pyarrow's jemalloc
background thread is turned off in it, ``JE_ARROW_MALLOC_CONF``), and it never touches a
device, so each rank can pick ``cuda:LOCAL_RANK`` itself. The price: this process's own
imports are its alone, one copy more than forking the ranks from it (docs/support.md).

The ranks are started and watched by torch's elastic agent (``elastic_launch``, the engine
behind ``torchrun``) with ``start_method="forkserver"``: rendezvous on a free local port,
the same environment as under ``torchrun`` (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``TORCHELASTIC_RESTART_COUNT`` ...), restarts with ``--max-restarts`` (a restarted rank
resumes from ``last.pt``), and SIGTERM/SIGINT forwarded to every rank, which stop at the
same step and write ``last.pt``. Each rank runs the unchanged command line, so everything
that works under ``torchrun`` works here. One node only; across nodes, use ``torchrun``.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.launcher.api import LaunchConfig

log = logging.getLogger(__name__)

# Imported by the forkserver before it forks any rank (its import does the preloading).
FORKSERVER_PRELOAD = "scalable_rec.forkserver_preload"

# pyarrow's bundled jemalloc starts a background thread when it loads; pyarrow allocates
# from mimalloc by default, so the thread only purges an unused heap.
NO_ALLOCATOR_THREAD = ("JE_ARROW_MALLOC_CONF", "background_thread:false")

# Set in the ranks' environment (inherited through the forkserver): this process launched them.
LAUNCHED_ENV = "SCALABLE_REC_LAUNCHED"

# Seconds a rank gets to write last.pt after the forwarded SIGTERM before it is killed, where
# torch's LaunchConfig takes a shutdown_timeout; older torch gives its fixed 30 s.
SHUTDOWN_TIMEOUT_S = 120


def _rank_main(entrypoint: Callable[[list[str]], int], argv: list[str]) -> int:
    code = entrypoint(argv)
    if code:
        # A failed or signalled rank leaves now, with its status, as a torchrun worker
        # would: the agent's process wrapper would otherwise wait for the agent to collect
        # a return value, which an agent shutting down after a signal never does.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _start_forkserver() -> None:
    """Names the forkserver's preload and starts it, with this process's environment (it
    holds LAUNCHED_ENV by now), before the agent starts any thread here."""
    os.environ.setdefault(*NO_ALLOCATOR_THREAD)
    multiprocessing.get_context("forkserver").set_forkserver_preload([FORKSERVER_PRELOAD])
    multiprocessing.forkserver.ensure_running()


def _launch_config(**options) -> LaunchConfig:
    """``LaunchConfig(**options)`` plus the shutdown timeout where this torch takes one
    (torch 2.11 has no ``shutdown_timeout``: its agent gives the ranks a fixed 30 s)."""
    from torch.distributed.launcher.api import LaunchConfig

    if "shutdown_timeout" in {field.name for field in dataclasses.fields(LaunchConfig)}:
        options["shutdown_timeout"] = SHUTDOWN_TIMEOUT_S
    return LaunchConfig(**options)


def _quiet_agent() -> None:
    import torch.distributed.elastic.agent.server.api  # noqa: F401 (creates its loggers)
    import torch.distributed.elastic.multiprocessing.api  # noqa: F401

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch(entrypoint: Callable[[list[str]], int], argv: Sequence[str], nproc: int, max_restarts: int = 0) -> int:
    """Runs ``entrypoint(argv)`` (for the command line, ``scalable_rec.cli.main``; a module-level
    function the forkserver can import by name) as ``nproc`` DDP ranks forked from a forkserver;
    returns the exit status: the largest of the ranks', ``128 + signal`` when this process was
    signalled (the ranks got the signal too and wrote ``last.pt``), 1 when a rank failed
    without one (its error is in its output above)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    if nproc < 1:
        raise ValueError(f"'nproc_per_node' needs to be positive (got {nproc})")
    if not log.isEnabledFor(logging.DEBUG):  # the ranks log their own errors; the agent's
        _quiet_agent()  # traceback of a rank's exit adds nothing
    os.environ[LAUNCHED_ENV] = "1"
    _start_forkserver()
    config = _launch_config(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"scalable-rec-{uuid.uuid4()}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=max_restarts,
        start_method="forkserver",
        monitor_interval=0.1,
    )
    try:
        codes = elastic_launch(config, _rank_main)(entrypoint, list(argv))
    except SignalException as err:
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        exit_codes = [f.exitcode for f in err.failures.values()]
        log.error("%d of %d ranks failed (exit codes %s)", len(exit_codes), nproc, exit_codes)
        return max((c for c in exit_codes if c > 0), default=1)
    return max(int(c or 0) for c in codes.values())


__all__ = ["FORKSERVER_PRELOAD", "LAUNCHED_ENV", "launch"]
