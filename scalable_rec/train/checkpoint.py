"""Checkpoints: atomic writes, RNG state for exact resume, and config compatibility."""
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
# what is computed. Anything else that differs is refused.
RESUMABLE_DIFFERENCES = {"epochs", "max_steps", "num_workers", "checkpoint_every", "log_every",
                         "patience", "run_dir", "resume", "progress",
                         "stop_check_every", "collective_timeout_s"}


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` under a temporary name, fsync, rename: a crash never leaves a torn file."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at '{path}'")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for a torn or foreign file
        raise CheckpointError(f"Checkpoint '{path}' cannot be read: {err}") from err


def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])


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
    changed = sorted(k for k in a.keys() | b.keys()
                     if a.get(k) != b.get(k) and k.rsplit(".", 1)[-1] not in RESUMABLE_DIFFERENCES)
    if changed:
        details = ", ".join(f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in changed)
        raise CheckpointError(f"Cannot resume: the config no longer matches the checkpoint ({details})")
