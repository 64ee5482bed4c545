"""The child process of `bench/data_prep.py --rss`: runs `python -m data_prep ARGS` and prints its peak RSS.

The peak is read from /proc/self/status (VmHWM, this process's own address space). ru_maxrss would not do:
Linux carries it across fork and exec, so a child of the 400 MB bench process reports at least 400 MB.
"""
from __future__ import annotations

import resource


def peak_rss_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux: the best figure there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run(argv: list[str]) -> int:
    from data_prep.__main__ import main
    rc = main(argv)
    print("maxrss_kb", peak_rss_kb())
    return rc
