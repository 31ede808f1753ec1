"""Helper for tests that start a launcher (torchrun or ``--nproc-per-node``) in a session of
its own: wait for it, or kill it and every rank it started (not collected by pytest)."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil
import pytest


def finish_group(proc: subprocess.Popen, timeout: int) -> tuple[str, str]:
    """``proc``'s stdout and stderr once it exits; after ``timeout`` seconds it and all its
    descendants are killed (a deadlock fails the test, none is left behind)."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # launchers start each rank in a session of its own: kill them one by one, or they
        # keep the pipes open (and keep running)
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"{proc.args[:4]} did not finish within {timeout}s (deadlock?):\n{err[-3000:]}")
