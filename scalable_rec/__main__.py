"""``python -m scalable_rec`` and the ``scalable-rec`` command."""

import os
import sys

from scalable_rec.heap import restart_with_hugepages

COMMAND = "scalable-rec"  # the console script's name (pyproject.toml [project.scripts])


def started_as_command(argv0: str | None = None) -> bool:
    """Whether this process is the ``scalable-rec`` command or ``python -m scalable_rec``:
    then re-executing its command line runs the same command again. Anywhere else (a
    script that calls ``main()``, ``python -c``, a program fed on stdin) it would run the
    caller again, or nothing."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if not argv0 or argv0 in ("-", "-c"):
        return False
    if os.path.basename(argv0) == COMMAND:
        return True
    try:  # under -m, sys.argv[0] is this file's full path
        return os.path.samefile(argv0, __file__)
    except OSError:
        return False


def main() -> int:
    if started_as_command():  # first: glibc reads its tunables only when a process starts
        restart_with_hugepages()
    from scalable_rec.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
