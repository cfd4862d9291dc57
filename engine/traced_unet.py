"""A small UNet run as TorchScript traces on a CPU: the same kernels, without Python's cost per module.

A UNet2DConditionModel call walks a few hundred Python modules. For the embedded models, whose
convolutions are tiny, that walk costs about a third of each evaluation on a 2-core CPU; a trace
runs the same ATen kernels from C++, so its output is bit-identical to the module's (checked in
tests/test_engine.py) and a generation takes about a quarter less time (tools/benchmark_traced_unet.py).

A trace is fixed to the Python branches its example took, and diffusers' UNet branches only on
shapes (upsampling sizes, padding), so there is one trace per combination of input shapes and
dtypes, made on first use. Calls the trace cannot stand for (ControlNet residuals, LCM's guidance
embedding, SDXL's added conditions, attention kwargs, autograd) go to the module itself, and so do
whole jobs while anything hooks the UNet (see `hooked`).
"""

from __future__ import annotations

import logging
import threading
import warnings

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

log = logging.getLogger(__name__)

# Shapes a session uses are few (the batch with and without CFG, a size or two); the traces share
# the UNet's weights, so each costs only its graphs. Those stay in TorchScript's process-wide
# compilation unit even once the trace is dropped (about 15-30 MB for the micro model's UNet, measured
# with tools/measure_trace_memory.py), so traces are never dropped and made again: past this many, other
# shapes run the module.
MAX_TRACES = 8
# For the same reason a model loaded again (a checkpoint switch and back) cannot free its old traces: an
# engine makes at most this many in all (TraceBudget), then runs every UNet as a module.
MAX_TRACES_AN_ENGINE = 16


class TraceBudget:
    """How many more traces an engine's models may make, shared by every model it loads."""

    def __init__(self, traces: int = MAX_TRACES_AN_ENGINE):
        self.traces, self.left = traces, traces
        self._told = False
        self._lock = threading.Lock()

    def take(self) -> bool:
        """One trace from the budget; False (logged the first time) once it is spent."""
        with self._lock:
            if self.left > 0:
                self.left -= 1
                return True
            if not self._told:
                self._told = True
                log.info(
                    "This server has made %d UNet traces, each of which stays in memory: further shapes and model "
                    "loads run the UNet as a module, about a quarter slower (a restart starts afresh)",
                    self.traces,
                )
            return False


class _PositionalUNet(torch.nn.Module):
    """The UNet called with positional tensors only, as torch.jit.trace needs."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def unet_rows(value, rows, total: int):
    """The rows `rows` (a slice or an index tensor) of a batched UNet input: a tensor of `total` rows, or a dict of
    them (SDXL's added conditions); any other value (a scalar timestep, None) as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
        return value[rows.to(value.device) if isinstance(rows, torch.Tensor) else rows]
    if isinstance(value, dict):
        return {key: unet_rows(item, rows, total) for key, item in value.items()}
    return value


class UNetStandIn(torch.nn.Module):
    """Stands in for a UNet2DConditionModel inside a pipeline: subclasses change how it is called, and
    anything else a pipeline asks for (config, dtype, device, add_embedding) comes from the UNet it wraps."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)


class TracedUNet(UNetStandIn):
    """Runs the UNet as TorchScript traces where it can (see the module's docstring)."""

    def __init__(self, unet: torch.nn.Module, budget: TraceBudget | None = None):
        super().__init__(unet)
        self._traces: dict[tuple, torch.jit.ScriptModule] = {}
        self._budget = budget if budget is not None else TraceBudget()
        self._broken = False

    @property
    def traced_sample_shapes(self) -> list[tuple[int, ...]]:
        """The latent batch shapes that have a trace, oldest first."""
        return [key[0][0] for key in self._traces]

    def hooked(self) -> bool:
        """Whether any of the UNet's modules has a forward hook or a replaced forward method.

        A trace runs such Python once, while tracing, and never again: a job must then run the module.
        (Walking the modules costs under a millisecond, so it is asked once a batch, not once a step.)"""
        return any(
            module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module)
            for module in self.unet.modules()
        )

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        traced = None
        if self._traceable(sample, timestep, encoder_hidden_states, args, kwargs):
            traced = self._trace_for(sample, timestep, encoder_hidden_states)
        if traced is None:
            return self.unet(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        # Without the executor's profiling runs, which would cost more than a short job saves. The
        # setting is per thread: it leaves every other thread's TorchScript alone.
        with torch.jit.optimized_execution(False):
            output = traced(sample, timestep, encoder_hidden_states)
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)

    def _traceable(self, sample, timestep, encoder_hidden_states, args, kwargs) -> bool:
        return (
            not self._broken
            and not args
            and all(value is None for value in kwargs.values())
            and not torch.is_grad_enabled()
            and all(isinstance(value, torch.Tensor) for value in (sample, timestep, encoder_hidden_states))
        )

    def _trace_for(self, sample, timestep, encoder_hidden_states) -> torch.jit.ScriptModule | None:
        key = tuple((tuple(value.shape), value.dtype) for value in (sample, timestep, encoder_hidden_states))
        traced = self._traces.get(key)
        if traced is not None or len(self._traces) >= MAX_TRACES or not self._budget.take():
            return traced
        try:
            with warnings.catch_warnings():
                # torch.jit.trace warns that it is deprecated, and at every Python branch on a shape;
                # the key above holds the shapes, so those branches are the ones this trace took.
                # (The filter is process-wide for the second or so a trace takes; traces are rare.)
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(
                    _PositionalUNet(self.unet), (sample, timestep, encoder_hidden_states), check_trace=False
                )
        except Exception:  # noqa: BLE001 - a UNet the tracer cannot follow still runs as a module
            log.warning("Could not trace the UNet; running it as a Python module from now on", exc_info=True)
            self._broken = True
            return None
        self._traces[key] = traced
        if len(self._traces) == MAX_TRACES:
            log.info("The UNet has %d traces; further input shapes run it as a module", MAX_TRACES)
        return traced
