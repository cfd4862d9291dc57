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
