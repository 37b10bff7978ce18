"""glibc's allocator set, once per worker, to keep the memory of large short-lived buffers instead of returning it.

Why (issue 15): a relayed 512 x 512 CT passes through two buffers of ~0.5 MB each (the PDU read from the remote, kept
as the instance's bytes until the requester has it), allocated and freed once per instance.  glibc's default
thresholds adapt: after the first such buffer is freed, buffers of its size come from the heap, and the heap is
trimmed back to the kernel whenever more than twice that size is free at its top, which two freed buffers are.
So every instance handed ~130 pages back (``madvise``) and faulted as many in afresh: measured with
``bench/gateway.py`` (which prints xdsi's minor page faults per instance) 50-120 faults per relayed instance by
default, 13-26 with the thresholds below, and the relay's throughput 3-10 % higher in A/B runs.  With 8 MiB kept
instead of 32, a relay holding its nine instances ahead of the requester (~6 MB of PDU buffers) freed them past
the threshold and was back at 26-125 faults: 32 MiB is within glibc's own adaptive range (up to 64 MiB).
tests/unit/test_heap.py shows the pattern: two 600 KB buffers per iteration, 261 faults each by default, none tuned.

:data:`MMAP_THRESHOLD` (allocations below it come from the heap, above it from their own mapping, as before for
anything larger than a 1 MiB PDU and its instance) and :data:`TRIM_THRESHOLD` (free memory at the top of a heap kept
up to this) are fixed, which also switches glibc's adaptation off.  The cost is memory kept: at most
:data:`TRIM_THRESHOLD` free per allocator arena (glibc makes at most eight per CPU, threads share them), which
the worker would otherwise return and fault back in.

Left alone when the operator chose otherwise (``GLIBC_TUNABLES`` naming a ``glibc.malloc`` tunable, or the older
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``), and wherever there is no glibc ``mallopt`` (musl, macOS,
another allocator preloaded).
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Mapping

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 32 << 20
_OPERATOR_CHOICES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def operator_chose(environ: Mapping[str, str]) -> bool:
    """Whether the environment already sets glibc's allocator thresholds (then they are the operator's)."""
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") or any(name in environ for name in _OPERATOR_CHOICES)


def tune_allocator(environ: Mapping[str, str] | None = None, libc: object | None = None) -> bool:
    """Set :data:`MMAP_THRESHOLD` and :data:`TRIM_THRESHOLD` for this process; True if glibc took both."""
    if operator_chose(os.environ if environ is None else environ):
        return False
    try:
        lib = ctypes.CDLL(None) if libc is None else libc
        mallopt = getattr(lib, "mallopt")
    except (OSError, AttributeError):  # no C library to ask, or one without mallopt: its own defaults stand
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.debug("mallopt refused the allocator thresholds; glibc's defaults stand")
    return ok
