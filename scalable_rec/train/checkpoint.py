"""Checkpoints: atomic writes, RNG state for exact resume, and config compatibility.

Checkpoints hold only tensors and plain Python values (dicts, lists, numbers, strings), so
they load with ``torch.load(weights_only=True)``: a crafted ``.pt`` file cannot run code
when ``score`` or ``--resume`` opens it. RNG states are stored in that form too.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalable_rec.atomic import atomic_open
from scalable_rec.errors import CheckpointError

# Config fields that may differ between a checkpoint and a resumed run without changing
# what is computed (``device``: the same run on other hardware, e.g. resumed on a machine
# with fewer GPUs or none; only float summation order differs). Anything else that differs
# is refused.
RESUMABLE_DIFFERENCES = {
    "epochs",
    "max_steps",
    "num_workers",
    "checkpoint_every",
    "log_every",
    "patience",
    "run_dir",
    "resume",
    "progress",
    "threads",
    "deterministic",
    "overwrite",
    "workdir",
    "strict",
    "max_skipped_share",
    "stop_check_every",
    "collective_timeout_s",
    "val_memory_mb",
    "heap_mmap_threshold_kb",
    "device",
    "sampler",
}
# Config groups that only say where outputs go or how to reach a server: never part of what
# a checkpoint computed, so ``--resume`` accepts new values (``--k``, ``--sink``, ...).
OUTPUT_GROUPS = ("score.", "sink.", "arango.", "export.", "arango_load.", "features.encode_")


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` under a temporary name, fsync, rename: a crash never leaves a torn file."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at '{path}'")
    try:
        # weights_only: tensors and plain containers only; unpickling code objects is refused.
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a torn or foreign file
        raise CheckpointError(f"Checkpoint '{path}' cannot be read: {err}") from err


def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """This process's random streams as tensors and plain values (no pickled objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].cpu().numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"].cpu())


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuses to resume when a field that changes the computation differs."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved), flat(current)
    changed = sorted(
        k
        for k in a.keys() | b.keys()
        if a.get(k) != b.get(k)
        and k.rsplit(".", 1)[-1] not in RESUMABLE_DIFFERENCES
        and not k.startswith(OUTPUT_GROUPS)
    )
    if changed:
        details = ", ".join(f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in changed)
        raise CheckpointError(f"Cannot resume: the config no longer matches the checkpoint ({details})")
