"""``python -m scalable_rec`` and the ``scalable-rec`` command."""
import sys

from scalable_rec.heap import restart_with_hugepages


def main() -> int:
    restart_with_hugepages()  # first: glibc reads its tunables only when a process starts
    from scalable_rec.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
