"""Ranks for tests/test_launch.py that report the process they were forked from (not
collected by pytest).

    python tests/fork_probe.py OUT_DIR

starts two ranks with ``launch``; each writes OUT_DIR/rank-RANK.json with its parent's pid
and the names of the threads its parent runs.
"""

import json
import os
import sys
from pathlib import Path

from scalable_rec.train.launch import launch


def rank(argv: list[str]) -> int:
    parent = os.getppid()
    threads = []
    for task in os.listdir(f"/proc/{parent}/task"):
        try:
            threads.append(Path(f"/proc/{parent}/task/{task}/comm").read_text().strip())
        except OSError:  # it has just ended
            pass
    report = {"parent": parent, "launcher": int(os.environ["PROBE_LAUNCHER"]), "threads": threads}
    Path(argv[0], f"rank-{os.environ['RANK']}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    os.environ["PROBE_LAUNCHER"] = str(os.getpid())
    sys.exit(launch(rank, sys.argv[1:], 2))
