"""glibc's fixed mmap threshold hands freed tensors back, and the restart with transparent
huge pages (scalable_rec/heap.py).

Each case runs in a fresh interpreter: the settings are process-wide."""

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scalable_rec.heap import HUGEPAGES_TUNABLE, RESTARTED_ENV, fix_mmap_threshold, glibc, hugepages_environ

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not glibc(), reason="glibc's mallopt and tunables only")

SCRIPT = textwrap.dedent("""
    import ctypes, sys, torch
    from scalable_rec.heap import M_MMAP_THRESHOLD, fix_mmap_threshold

    class MallInfo2(ctypes.Structure):  # glibc >= 2.33
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    # Where glibc's dynamic threshold ends up once large tensors have been freed (it rises
    # to the freed mapping's size, up to 32 MiB).
    assert libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    if sys.argv[1] == "fixed":
        assert fix_mmap_threshold(1 << 20)
    before = libc.mallinfo2().hblkhd  # bytes in chunks that are mappings of their own
    t = torch.ones(1 << 20)  # 4 MiB, like a step's activations
    mapped = libc.mallinfo2().hblkhd - before
    del t
    print(mapped / 2**20, (libc.mallinfo2().hblkhd - before) / 2**20)
""")


def _mapped_mib(mode: str) -> tuple[float, float]:
    """MiB of a 4 MiB tensor in a mapping of its own, while it lives and after it is freed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    live, freed = out.stdout.strip().splitlines()[-1].split()
    return float(live), float(freed)


def test_large_tensors_get_their_own_mapping_and_go_back_when_freed():
    # with the raised threshold the tensor comes from the heap, which keeps it when freed
    assert _mapped_mib("raised") == (0.0, 0.0)
    live, freed = _mapped_mib("fixed")
    assert live >= 4.0 and freed == 0.0  # its own mapping, unmapped on free


def test_threshold_is_checked():
    with pytest.raises(ValueError, match="threshold_bytes"):
        fix_mmap_threshold(64 << 20)
    with pytest.raises(ValueError, match="threshold_bytes"):
        fix_mmap_threshold(0)


def test_hugepages_environ_adds_the_tunable_once_and_respects_the_users():
    env = hugepages_environ({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + HUGEPAGES_TUNABLE
    assert env["PATH"] == "/bin" and env[RESTARTED_ENV] == "1"
    assert hugepages_environ({})["GLIBC_TUNABLES"] == HUGEPAGES_TUNABLE
    assert hugepages_environ(env) is None  # restarted once: never again
    assert hugepages_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's opt-out


RESTART = textwrap.dedent("""
    import os, sys
    print("start", os.getpid(), flush=True)
    from scalable_rec.heap import fix_mmap_threshold, restart_with_hugepages
    restart_with_hugepages()
    print("running", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
    import torch
    fix_mmap_threshold(1 << 20)  # as store-backed training does: the tensor gets its own mapping
    t = torch.ones(32 << 20)  # 128 MiB, written once
    huge = [line for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:")]
    print("huge_kib", int(huge[0].split()[1]) if huge else -1, flush=True)
""")


def _thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else "[never]"
    return text[text.index("[") + 1 : text.index("]")]


def test_restart_keeps_the_process_and_its_arguments_and_gets_huge_pages():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", RESTARTED_ENV)}
    out = subprocess.run(
        [sys.executable, "-c", RESTART, "--flag", "x"],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    starts = [ln.split()[1] for ln in lines if ln.startswith("start")]
    running = [ln for ln in lines if ln.startswith("running")]
    assert len(starts) == 2 and starts[0] == starts[1]  # restarted once, in the same process
    assert running == [f"running {starts[0]} {HUGEPAGES_TUNABLE} ['--flag', 'x']"]
    if _thp_mode() == "never":
        pytest.skip("the kernel's transparent huge pages are off (/sys/kernel/mm/transparent_hugepage)")
    huge = int(lines[-1].split()[1])
    assert huge >= 64 << 10, f"only {huge} KiB of a 128 MiB tensor in huge pages"
    # the user's opt-out: no restart, and (where huge pages come only when asked) none
    out = subprocess.run(
        [sys.executable, "-c", RESTART],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "OMP_NUM_THREADS": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert sum(ln.startswith("start") for ln in lines) == 1
    if _thp_mode() == "madvise":
        assert int(lines[-1].split()[1]) == 0


def test_auto_heap_threshold_is_fixed_only_when_ranks_share_the_node(monkeypatch):
    """``heap_mmap_threshold_kb`` -1 (default): 1024 KiB for ranks that share a node, glibc's
    dynamic threshold for a rank alone on its node; an explicit value always wins."""
    from scalable_rec.dist import DistEnv
    from scalable_rec.train import TrainConfig

    auto = TrainConfig()
    assert auto.heap_mmap_threshold_kb == -1
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert auto.heap_threshold_kb(DistEnv()) == 0  # one process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    two_here = DistEnv(rank=1, local_rank=1, world_size=2)
    assert auto.heap_threshold_kb(two_here) == 1024
    assert TrainConfig(heap_mmap_threshold_kb=0).heap_threshold_kb(two_here) == 0
    assert TrainConfig(heap_mmap_threshold_kb=4096).heap_threshold_kb(DistEnv()) == 4096
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two nodes, one rank on each
    assert auto.heap_threshold_kb(DistEnv(rank=1, local_rank=0, world_size=2)) == 0
    with pytest.raises(ValueError, match="heap_mmap_threshold_kb"):
        TrainConfig(heap_mmap_threshold_kb=-2)


def _command(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", RESTARTED_ENV)}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"}, **kwargs
    )


def _tunables_logged(stderr: str) -> list[str]:
    """The ``GLIBC_TUNABLES`` the CLI logged it runs with (``-v``), one entry per start."""
    return [line.split("GLIBC_TUNABLES=", 1)[1] for line in stderr.splitlines() if "GLIBC_TUNABLES=" in line]


def test_the_command_runs_with_huge_pages_and_a_caller_of_main_is_not_restarted(tmp_path):
    """``python -m scalable_rec`` and the ``scalable-rec`` script run the command itself with
    the tunable; a program that calls ``main()`` (from a file, or fed on stdin) runs the
    command once, without a restart that would re-run the caller or nothing at all."""
    synth = ["-v", "synth", "--preset", "tiny", "--out"]
    out = _command([sys.executable, "-m", "scalable_rec", *synth, str(tmp_path / "m")])
    assert out.returncode == 0, out.stderr[-2000:]
    assert _tunables_logged(out.stderr) == [HUGEPAGES_TUNABLE] and (tmp_path / "m" / "manifest.json").is_file()
    script = Path(sys.executable).with_name("scalable-rec")  # the console script, where installed
    if script.is_file():
        out = _command([str(script), *synth, str(tmp_path / "s")])
        assert out.returncode == 0, out.stderr[-2000:]
        assert _tunables_logged(out.stderr) == [HUGEPAGES_TUNABLE] and (tmp_path / "s" / "manifest.json").is_file()
    caller = textwrap.dedent(f"""
        import sys
        print("caller ran", flush=True)
        from scalable_rec.__main__ import main
        sys.argv = ["caller", *{synth!r}, {str(tmp_path)!r} + "/OUT"]
        sys.exit(main())
    """)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(caller.replace("OUT", "w"))
    out = _command([sys.executable, str(wrapper)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("caller ran") == 1 and _tunables_logged(out.stderr) == [""]
    assert (tmp_path / "w" / "manifest.json").is_file()
    out = _command([sys.executable, "-"], input=caller.replace("OUT", "i"))  # a program on stdin
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("caller ran") == 1 and (tmp_path / "i" / "manifest.json").is_file()
