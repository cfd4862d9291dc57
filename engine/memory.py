"""How much memory the program and the device use: A1111's /sdapi/v1/memory report, and a one-line summary."""

from __future__ import annotations

import os
from typing import Any

import psutil
import torch


def memory_report(device: torch.device) -> dict[str, Any]:
    """A1111's memory answer: {"ram": {...}, "cuda": {...}} in bytes.

    "ram" is this process's resident memory as "used" against the machine's "total"; "free" is what the
    machine has available (A1111 reports total minus this process, which counts other programs' memory as
    free). "cuda" is torch's allocator statistics for a CUDA device, else {"error": "unavailable"}, as
    A1111 answers on a machine without one."""
    try:
        system = psutil.virtual_memory()
        used = psutil.Process(os.getpid()).memory_info().rss
        ram: dict[str, Any] = {"free": system.available, "used": used, "total": system.total}
    except (psutil.Error, OSError) as exc:
        ram = {"error": str(exc)}
    return {"ram": ram, "cuda": _cuda_report(device)}


def _cuda_report(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda" or not torch.cuda.is_available():
        return {"error": "unavailable"}
    try:
        free, total = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
    except RuntimeError as exc:
        return {"error": str(exc)}

    def current_and_peak(name: str) -> dict[str, int]:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": current_and_peak("active_bytes"),
        "allocated": current_and_peak("allocated_bytes"),
        "reserved": current_and_peak("reserved_bytes"),
        "inactive": current_and_peak("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }


def describe_memory(report: dict[str, Any]) -> str:
    """One line for a person: this program's memory, the machine's free memory, and the GPU's when there is one."""
    ram = report["ram"]
    parts = [
        f"RAM: this program {_size(ram['used'])}, {_size(ram['free'])} free of {_size(ram['total'])}"
        if "error" not in ram
        else f"RAM: unknown ({ram['error']})"
    ]
    cuda = report["cuda"]
    if "error" not in cuda:
        parts.append(
            f"GPU: torch holds {_size(cuda['reserved']['current'])} (peak {_size(cuda['reserved']['peak'])}), "
            f"{_size(cuda['system']['free'])} free of {_size(cuda['system']['total'])}"
        )
    return "; ".join(parts)


def _size(count: int) -> str:
    if count >= 1024**3:
        return f"{count / 1024**3:.2f} GB"
    return f"{count / 1024**2:.0f} MB"


# What torch's CPU allocator says when it cannot get memory (a RuntimeError, not torch.OutOfMemoryError).
_CPU_ALLOCATOR_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the device (or, on a CPU, the machine) running out of memory."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _CPU_ALLOCATOR_FAILURES)


def out_of_memory_message(error: BaseException, device: torch.device, width: int, height: int, batch: int) -> str:
    """What to tell whoever ran a job that ran out of memory: what it asked for, and what asks for less."""
    where = "the machine's memory" if device.type == "cpu" else f"the {device.type} device's memory"
    said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"The job ran out of {where} ({width}x{height}, batch size {batch}). Try a smaller size or batch size, "
        f"or hires fix at a smaller scale; what the job held is freed, so the next one runs. (torch: {said})"
    )


def release_cached_memory(device: torch.device) -> None:
    """Hand memory torch keeps cached for the device back to it, after a job that ran out of it."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and torch.backends.mps.is_available():
        torch.mps.empty_cache()
