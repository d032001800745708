"""Host memory on CPU runs: keep large freed tensors from pinning the heap.

    pin_mmap_threshold(4 * 2**20)     # glibc: blocks >= 4 MiB are mmapped, returned to the OS on free

glibc's malloc serves a block above its mmap threshold with its own mapping, which `free`
unmaps; below it, from the heap, which returns memory to the OS only from its top. The
threshold starts at 128 KiB and by default grows to the size of each mmapped block that is
freed (up to 32 MiB), so after a few steps a training process serves its layer-sized
tensors (gathered ZeRO-3 parameters, gradients, reduce buckets: 4-16 MiB at d 1024) from
the heap, where one long-lived block above them keeps the whole span resident. The peak
RSS then holds the full model's worth of such transients on every rank, whatever the
number of ranks (bench/fm_memory.py: ZeRO-3 2 ranks / 1 rank 0.70 with the dynamic
threshold, 0.57 with it pinned at 4 MiB). Setting M_MMAP_THRESHOLD also turns the dynamic
growth off. Cost measured: 0-3% of the demo FM's tokens/s (fresh mappings are zeroed pages).
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3          # glibc <malloc.h>


def pin_mmap_threshold(nbytes: int) -> bool:
    """Pin glibc's mmap threshold at `nbytes` (0: leave malloc as it is). Returns whether it
    was set (False where the C library is not glibc, e.g. macOS, or mallopt refused)."""
    if nbytes <= 0:
        return False
    if nbytes > 32 * 2 ** 20:  # glibc caps the threshold at HEAP_MAX/2 (32 MiB on 64-bit) and refuses more
        raise ValueError(f"pin_mmap_threshold: {nbytes} bytes is above glibc's 32 MiB maximum")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))
