"""What the operating system knows about this process and its files, on POSIX and on Windows.

Four facts edgegen needs and the standard library only gives on POSIX: peak resident memory
(`resource`), physical memory (`os.sysconf`), a file's change time (`st_ctime` is the creation time on
Windows, not the time of the last change), and whether a process is alive (`os.kill(pid, 0)`: on Windows
signal 0 is CTRL_C_EVENT, which would interrupt that process's console group). On Windows they come from
the Win32 API through ctypes; when an answer cannot be had, the functions return None (or the safe answer)
and callers fall back to the safe choice. Also: a memory map with the OS's random-access hint (`map_npy`)
and a read-ahead request for the rows a call is about to gather from it (`prefetch_rows`).
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import numpy as np

WINDOWS = os.name == "nt"


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB, or None where it cannot be read."""
    if WINDOWS:
        return _windows_peak_working_set_mb()
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # macOS: bytes; Linux, BSD: KiB


def map_npy(path: Path) -> np.ndarray:
    """A read-only memory map of a .npy file whose rows are read in random order (the per-layer embedding
    table: a few rows a step out of 262,144). Readahead is switched off where the OS allows it: with it, every
    row touched pulled its neighbours into memory as well (measured on E2B: 615 MiB of the table resident
    after an 8K-token prompt, for ~70 MiB of rows read)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        if fortran or dtype.hasobject:
            raise ValueError(f"{path.name} is not a plain C-ordered array")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):  # POSIX; Windows maps without the hint
        mm.madvise(mmap.MADV_RANDOM)
    try:
        return np.ndarray(shape, dtype, buffer=mm, offset=offset)
    except TypeError:  # numpy's word for a buffer shorter than the header says
        raise ValueError(f"{path.name} is truncated") from None


def prefetch_rows(rows: np.ndarray, ids: np.ndarray) -> None:
    """Ask the OS to start reading rows[ids] of a `map_npy` table (MADV_WILLNEED, one request per row) before
    they are touched. Rows not in memory are otherwise read one page fault at a time, each waiting for the
    disk; requested together they are read concurrently (E2B's per-layer table on a 2-core VM's disk, 128 rows
    not in memory: 66.9 ms gathered as touched, 28.9 ms prefetched; 5 rows 1.0 vs 0.3 ms; benchmarks/
    ple_cold.py). No-op where madvise is missing (Windows) or for one row."""
    mm = rows.base
    if len(ids) < 2 or not isinstance(mm, mmap.mmap) or not hasattr(mmap, "MADV_WILLNEED"):
        return
    start = rows.ctypes.data - np.frombuffer(mm, np.uint8, count=1).ctypes.data  # the header's length
    step = rows.strides[0]
    for i in np.unique(ids):
        first = start + int(i) * step
        page = first - first % mmap.PAGESIZE
        mm.madvise(mmap.MADV_WILLNEED, page, first + step - page)


def physical_memory() -> int | None:
    """Installed physical memory in bytes, or None."""
    if WINDOWS:
        return _windows_physical_memory()
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists. Unknown (the OS call failed) counts as alive: callers only remove what
    a dead process left behind."""
    if WINDOWS:
        alive = _windows_process_alive(pid)
        return True if alive is None else alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def change_time_ns(path: Path, st: os.stat_result) -> int | None:
    """When the file's content or metadata last changed (a time users cannot set back), or None.

    POSIX: st_ctime. Windows: the ChangeTime of FILE_BASIC_INFO (st_ctime there is the creation time)."""
    if WINDOWS:
        return _windows_change_time(path)
    return st.st_ctime_ns


# -- Win32 through ctypes: each returns None when the call is unavailable or fails -----------------------

_WIN_ERRORS = (ImportError, AttributeError, OSError, ValueError, TypeError)


def _windows_peak_working_set_mb() -> float | None:
    try:
        import ctypes
        from ctypes import wintypes

        class ProcessMemoryCounters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                        ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                        ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                        ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
                        ("QuotaNonPagedPoolUsage", ctypes.c_size_t), ("PagefileUsage", ctypes.c_size_t),
                        ("PeakPagefileUsage", ctypes.c_size_t)]

        current = ctypes.windll.kernel32.GetCurrentProcess
        current.restype = wintypes.HANDLE  # a pseudo-handle (-1): it must not be truncated to a C int
        get_info = ctypes.windll.psapi.GetProcessMemoryInfo
        get_info.argtypes = [wintypes.HANDLE, ctypes.POINTER(ProcessMemoryCounters), wintypes.DWORD]
        get_info.restype = wintypes.BOOL
        counters = ProcessMemoryCounters()
        counters.cb = ctypes.sizeof(counters)
        if not get_info(current(), ctypes.byref(counters), counters.cb):
            return None
        return round(counters.PeakWorkingSetSize / 2**20, 1)
    except _WIN_ERRORS:
        return None


def _windows_physical_memory() -> int | None:
    try:
        import ctypes
        from ctypes import wintypes

        class MemoryStatusEx(ctypes.Structure):  # MEMORYSTATUSEX
            _fields_ = [("dwLength", wintypes.DWORD), ("dwMemoryLoad", wintypes.DWORD),
                        ("ullTotalPhys", ctypes.c_uint64), ("ullAvailPhys", ctypes.c_uint64),
                        ("ullTotalPageFile", ctypes.c_uint64), ("ullAvailPageFile", ctypes.c_uint64),
                        ("ullTotalVirtual", ctypes.c_uint64), ("ullAvailVirtual", ctypes.c_uint64),
                        ("ullAvailExtendedVirtual", ctypes.c_uint64)]

        status = MemoryStatusEx()
        status.dwLength = ctypes.sizeof(status)
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return None
        return int(status.ullTotalPhys)
    except _WIN_ERRORS:
        return None


def _windows_change_time(path: Path) -> int | None:
    try:
        import ctypes
        import msvcrt
        from ctypes import wintypes

        class FileBasicInfo(ctypes.Structure):  # FILE_BASIC_INFO; times in 100 ns units since 1601
            _fields_ = [("CreationTime", ctypes.c_int64), ("LastAccessTime", ctypes.c_int64),
                        ("LastWriteTime", ctypes.c_int64), ("ChangeTime", ctypes.c_int64),
                        ("FileAttributes", wintypes.DWORD)]

        get_info = ctypes.windll.kernel32.GetFileInformationByHandleEx
        get_info.argtypes = [wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD]
        get_info.restype = wintypes.BOOL
        info = FileBasicInfo()
        with open(path, "rb") as fh:
            handle = msvcrt.get_osfhandle(fh.fileno())
            if not get_info(handle, 0, ctypes.byref(info), ctypes.sizeof(info)):  # 0: FileBasicInfo
                return None
        return int(info.ChangeTime) * 100
    except _WIN_ERRORS:
        return None


def _windows_process_alive(pid: int) -> bool | None:
    try:
        import ctypes
        from ctypes import wintypes

        kernel32 = ctypes.windll.kernel32
        kernel32.OpenProcess.restype = wintypes.HANDLE
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:  # access denied (5): it exists; anything else (87: invalid parameter): no such process
            return kernel32.GetLastError() == 5
        try:
            code = wintypes.DWORD()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return None
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    except _WIN_ERRORS:
        return None
