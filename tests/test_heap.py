"""glibc's fixed mmap threshold hands freed tensors back (train/heap.py).

Each case runs in a fresh interpreter: the setting is process-wide."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from scalable_rec.train.heap import fix_mmap_threshold

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt only")

SCRIPT = textwrap.dedent("""
    import ctypes, sys, torch
    from scalable_rec.train.heap import M_MMAP_THRESHOLD, fix_mmap_threshold

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
