"""The process's resident memory, as the streaming run's peak RSS gate and the hostile-input
bombs (``tests/fuzz/bombs.py``) read it. Standard library only: the bombs' child process
measures its peak above the RSS after its imports.

- ``peak_rss_bytes``: VmHWM from ``/proc/self/status``, the high-water mark of this
  address space. Not ``getrusage().ru_maxrss`` where VmHWM exists: on Linux ru_maxrss
  carries the parent's high-water mark across fork + exec (measured: every bomb child
  reported the test process's 600 MB). ru_maxrss elsewhere.
- ``reset_peak_rss``: start that mark over at the current RSS (Linux 4.0 and later:
  writing 5 to ``/proc/self/clear_refs``), so a measurement in a process that did other
  work first reads its own peak.
"""

from __future__ import annotations

import resource


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (since the last reset)."""
    kib = _status_kib("VmHWM:")
    if kib is None:
        kib = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return kib * 1024


def rss_bytes() -> int:
    """The process's resident set size now (0 where /proc is not there)."""
    kib = _status_kib("VmRSS:")
    return 0 if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Start the peak over at the current RSS; False when the system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return True
