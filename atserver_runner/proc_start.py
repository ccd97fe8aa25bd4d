"""Whether a recorded PID still names the process that was recorded.

A PID file outlives its process, and the kernel recycles PIDs, so a record names a process by
its PID *and its start*. The start to compare is the kernel's: ``starttime`` in
``/proc/<pid>/stat``, clock ticks since boot, which never changes. psutil's ``create_time()``
is that plus the boot time in wall-clock seconds (``btime`` in ``/proc/stat``), which moves in
whole seconds when the clock is stepped (NTP, a VM's clock sync): two readings of the same
process, taken minutes apart in two processes, may then differ by a second or more, and a
fence comparing them takes a running atServer for a recycled PID and stops nothing.

Records of an earlier version carry only ``create_time``; they are compared as before, within
:data:`CREATE_TIME_TOLERANCE_S`.
"""

from __future__ import annotations

CREATE_TIME_TOLERANCE_S = 0.05
"""How far two create times of one process may differ (records without a start tick)."""


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    _, sep, rest = raw.rpartition(")")  # the command name may hold spaces and parentheses
    return rest.split() if sep else None


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (stable for the process's life), or
    None if there is no such process."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3 (state)
    except ValueError:
        return None


def same_process(pid: int, *, ticks: int | None = None, create_time: float | None = None) -> bool:
    """``pid`` runs, is not a zombie, and (when given) started at ``ticks``; a record without
    ``ticks`` but with ``create_time`` is compared by psutil's create time instead."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] in ("Z", "X", "x"):
        return False
    if ticks:
        return fields[19] == str(ticks)
    if create_time is not None:
        import psutil

        try:
            return abs(psutil.Process(pid).create_time() - create_time) <= CREATE_TIME_TOLERANCE_S
        except psutil.Error:
            return False
    return True


__all__ = ["CREATE_TIME_TOLERANCE_S", "same_process", "start_ticks"]
