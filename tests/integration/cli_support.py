"""Helpers for the ``xdsi`` command tests (tests/integration/test_cli_*.py)."""

from __future__ import annotations


def without_dac_override() -> None:
    """In the child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set.

    root reads every file whatever its mode; without these two capabilities (and with an empty
    inheritable set, as here) the exec'd process is root that permission bits apply to.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h)
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
