"""A1111's hypernetworks, from its `models/hypernetworks` folder, switched on per job by `<hypernet:name:strength>`.

A hypernetwork is a pair of small residual MLPs for each width of attention context it was trained on (SD 1.x: 768
for the prompt's token states, and 320, 640 and 1280 for the picture's own in self-attention). A1111 passes the
context each attention layer reads through them before its key and value projections: key from
context + mlp_k(context) x strength, value from context + mlp_v(context) x strength, the query untouched, every
hypernetwork of the prompt in turn. Here each of the UNet's key and value projections gets a forward pre-hook that
does that for the job, removed when the job ends, so the UNet runs as a module (not its trace) while one is on and
exactly as before once it is off.

Files are A1111's own `.pt` (what its Train tab saves): a dict of {width: (mlp_k state dict, mlp_v state dict)} and
how the MLPs are built (layer structure, activation, layer norm, dropout). They are read with torch's weights-only
unpickler, which refuses a file that would run code.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InvalidRequestError
from .lora import files_by_stem, named
from .prompts import network_tags

log = logging.getLogger(__name__)

HYPERNET_SUFFIXES = (".pt",)

# A1111's activation names: its own few, and every class in torch.nn.modules.activation by its lower-case name.
_ACTIVATIONS = {
    name.lower(): getattr(torch.nn.modules.activation, name) for name in torch.nn.modules.activation.__all__
}
_ACTIVATIONS.update(
    linear=torch.nn.Identity,
    relu=torch.nn.ReLU,
    leakyrelu=torch.nn.LeakyReLU,
    elu=torch.nn.ELU,
    swish=torch.nn.Hardswish,
    tanh=torch.nn.Tanh,
    sigmoid=torch.nn.Sigmoid,
)


# A1111's first files named the two layers linear1 and linear2.
_OLD_NAMES = {f"linear{i + 1}.{part}": f"linear.{i}.{part}" for i in range(2) for part in ("weight", "bias")}


@dataclass(frozen=True)
class HypernetUse:
    """One `<hypernet:name:strength>` tag."""

    name: str
    strength: float
    tag: str


def hypernet_uses(prompt: str) -> list[HypernetUse]:
    """The hypernetworks a prompt's tags ask for, in order (a name given twice: the last tag's strength, at the first
    tag's place). Raises InvalidRequestError naming the tag when the strength is not a number."""
    uses: dict[str, HypernetUse] = {}
    for name, rest, text in network_tags(prompt, "hypernet"):
        if len(rest) > 1:
            raise InvalidRequestError("prompt", text, "<hypernet:name> or <hypernet:name:strength>")
        try:
            strength = float(rest[0]) if rest else 1.0
        except ValueError:
            raise InvalidRequestError("prompt", text, "a number for the hypernetwork's strength") from None
        uses[name] = HypernetUse(name, strength, text)
    return list(uses.values())


@dataclass(frozen=True)
class HypernetFile:
    name: str
    path: Path


def scan_hypernets(folder: Path) -> dict[str, HypernetFile]:
    """Every hypernetwork under `folder` (subfolders too), by name (the file's stem)."""
    found = files_by_stem(folder, HYPERNET_SUFFIXES)
    # A1111 leaves out a file named None: "None" is its setting's value for no hypernetwork.
    return {name: HypernetFile(name, path) for name, path in found.items() if name != "None"}


def dropout_structure(layer_structure: list, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's dropout after each layer when a file gives only use_dropout: 0.3 after the hidden layers (and after
    the last hidden one only with last_layer_dropout), never after the first or the output."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    return [0.0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0.0, 0.0]


class HypernetworkModule(torch.nn.Module):
    """One residual MLP, laid out as A1111 lays it out (its state dict's keys index this Sequential)."""

    def __init__(
        self,
        width: int,
        layer_structure: list,
        activation: str | None,
        layer_norm: bool,
        activate_output: bool,
        dropouts: list[float],
    ):
        super().__init__()
        layers: list[torch.nn.Module] = []
        last = len(layer_structure) - 2
        for i in range(len(layer_structure) - 1):
            layers.append(torch.nn.Linear(int(width * layer_structure[i]), int(width * layer_structure[i + 1])))
            if activation not in (None, "linear") and (i < last or activate_output):
                layers.append(_ACTIVATIONS[activation]())
            if layer_norm:
                layers.append(torch.nn.LayerNorm(int(width * layer_structure[i + 1])))
            if dropouts[i + 1] > 0:  # inert in eval mode, but it takes a place in the Sequential
                layers.append(torch.nn.Dropout(p=dropouts[i + 1]))
        self.linear = torch.nn.Sequential(*layers)

    def forward(self, context: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return context + self.linear(context) * strength


@dataclass
class Hypernetwork:
    """A loaded hypernetwork: its (key, value) MLPs by context width."""

    name: str
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]]

    def modules(self) -> list[HypernetworkModule]:
        return [module for pair in self.layers.values() for module in pair]


def build_hypernetwork(name: str, state: dict) -> Hypernetwork:
    """A hypernetwork from A1111's saved dict; ValueError saying what does not fit."""
    layer_structure = list(state.get("layer_structure") or [1, 2, 1])
    if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise ValueError(f"its layer structure {layer_structure} does not start and end with 1")
    activation = state.get("activation_func")
    if activation not in (None, "linear") and activation not in _ACTIVATIONS:
        raise ValueError(f"its activation {activation!r} is not one torch has")
    dropouts = state.get("dropout_structure")
    if dropouts is None:
        dropouts = dropout_structure(
            layer_structure, bool(state.get("use_dropout", False)), bool(state.get("last_layer_dropout", False))
        )
    if len(dropouts) != len(layer_structure):
        raise ValueError(f"its dropout structure {list(dropouts)} does not match its layers {layer_structure}")
    layers = {}
    for width, pair in state.items():
        if not isinstance(width, int):
            continue
        made = []
        for weights in pair:
            module = HypernetworkModule(
                width,
                layer_structure,
                activation,
                bool(state.get("is_layer_norm", False)),
                bool(state.get("activate_output", True)),  # A1111's default for files without the key
                list(dropouts),
            )
            module.load_state_dict({_OLD_NAMES.get(key, key): value for key, value in weights.items()})
            made.append(module.eval().requires_grad_(False))
        if len(made) != 2:
            raise ValueError(f"width {width} has {len(made)} networks, not a key and a value one")
        layers[width] = (made[0], made[1])
    if not layers:
        raise ValueError("it has no layers")
    return Hypernetwork(str(state.get("name") or name), layers)


def read_hypernetwork(path: Path) -> Hypernetwork:
    """A hypernetwork file (A1111's .pt); ValueError saying why it cannot be used."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:  # torch's weights-only unpickler met something that would be built by running code
            raise ValueError(
                f"it holds Python objects other than tensors ({found.group(1)}), which are not read"
            ) from None
        raise ValueError("it cannot be read as a PyTorch file") from None
    except Exception as exc:  # noqa: BLE001 - a file cut short fails deep in torch's reader, in any of its ways
        raise ValueError(f"it cannot be read as a PyTorch file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ValueError("it is not a hypernetwork's dict")
    try:
        return build_hypernetwork(path.stem, state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:  # load_state_dict's mismatches, odd values
        detail = " ".join(str(exc).split()).removeprefix("Error(s) in loading state_dict for HypernetworkModule: ")
        raise ValueError(f"its layers do not fit its own structure ({detail[:300]})") from None


def attention_projections(unet: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """The (key, value) projections of every attention layer of a UNet, self- and cross-attention alike."""
    return [
        (module.to_k, module.to_v)
        for module in unet.modules()
        if isinstance(getattr(module, "to_k", None), torch.nn.Module) and hasattr(module, "to_v")
    ]


def _context_width(projection: torch.nn.Module) -> int:
    return int(getattr(projection, "in_features", 0) or projection.weight.shape[1])


def apply_hypernetworks(unet: torch.nn.Module, applied: list[tuple[Hypernetwork, float]]) -> list:
    """Hook every key and value projection of `unet` so that it reads its context through `applied` (hypernetworks
    and strengths, in order) as A1111 does; returns the hooks' handles (remove them to switch it off)."""
    handles = []
    for key, value in attention_projections(unet):
        width = _context_width(key)
        for projection, which in ((key, 0), (value, 1)):
            chain = [(net.layers[width][which], strength) for net, strength in applied if width in net.layers]
            if chain:
                handles.append(projection.register_forward_pre_hook(_through(chain)))
    return handles


def _through(chain: list[tuple[HypernetworkModule, float]]):
    def hook(_module, args):
        context = args[0]
        passed = context.float()  # A1111 runs them in float32 and casts back
        for module, strength in chain:
            passed = module(passed, strength)
        return (passed.to(context.dtype), *args[1:])

    return hook


@dataclass
class Hypernetworks:
    """The hypernetworks one model's jobs use: read once each, hooked into its UNet for the job that names them."""

    folder: Path
    loaded: dict[tuple, Hypernetwork] = field(default_factory=dict)  # (path, size, mtime) -> the network
    handles: list = field(default_factory=list)
    active: tuple = ()

    def resolve(
        self, uses: list[HypernetUse], unet: torch.nn.Module
    ) -> list[tuple[HypernetUse, Hypernetwork, HypernetFile]]:
        """The networks `uses` name, read now; InvalidRequestError naming an unknown or unreadable one, or one with
        none of the context widths of `unet`'s attention (made for another kind of model)."""
        if not uses:
            return []
        widths = {_context_width(key) for key, _value in attention_projections(unet)}
        available = scan_hypernets(self.folder)
        resolved = []
        for use in uses:
            found = named(available, use.name)
            if found is None:
                names = ", ".join(sorted(available)) or "none"
                raise InvalidRequestError(
                    "prompt", use.tag, f"the name of a hypernetwork in {self.folder} (there: {names})"
                )
            network = self._read(use, found)
            if not widths & set(network.layers):
                raise InvalidRequestError(
                    "prompt",
                    use.tag,
                    f"a hypernetwork for this model, whose attention reads contexts {sorted(widths)} wide; "
                    f"{found.path.name} is for {sorted(network.layers)}",
                )
            resolved.append((use, network, found))
        return resolved

    def _read(self, use: HypernetUse, found: HypernetFile) -> Hypernetwork:
        key = _file_key(found.path)
        if key not in self.loaded:
            try:
                self.loaded[key] = read_hypernetwork(found.path)
            except ValueError as exc:
                raise InvalidRequestError(
                    "prompt", use.tag, f"a hypernetwork A1111 saves; {found.path.name}: {exc}"
                ) from None
            log.info("Loaded hypernetwork %s from %s", found.name, found.path)
        return self.loaded[key]

    def switch(self, unet: torch.nn.Module, resolved: list[tuple[HypernetUse, Hypernetwork, HypernetFile]]) -> None:
        """Hook exactly `resolved` into `unet` (none: unhook all)."""
        wanted = tuple((str(found.path), use.strength) for use, _net, found in resolved)
        if wanted == self.active:
            return
        self.off()
        if resolved:
            parameter = next(unet.parameters())
            for _use, net, _found in resolved:
                for module in net.modules():
                    module.to(parameter.device)
            self.handles = apply_hypernetworks(unet, [(net, use.strength) for use, net, _found in resolved])
        self.active = wanted

    def off(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.active = [], ()


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


def with_added_hypernet(prompt: str, name: str | None, multiplier: float) -> str:
    """A1111's "Add hypernetwork to prompt" (its sd_hypernetwork setting): `name`'s tag at `multiplier` at the
    prompt's end, as A1111 adds it (no space before it, the multiplier as Python writes a float), unless the prompt
    names that hypernetwork already; "None" or no name adds nothing."""
    if name in (None, "", "None"):
        return prompt
    prompt = prompt or ""
    if any(use.name.lower() == name.lower() for use in hypernet_uses(prompt)):
        return prompt
    return f"{prompt}<hypernet:{name}:{float(multiplier)}>"
