"""Upscaler models (A1111's ESRGAN and Real-ESRGAN upscalers) for the hires fix and Extras.

Files come from A1111's folders, `models/ESRGAN` and `models/RealESRGAN` (`.pth`, `.pt`, `.ckpt`,
`.safetensors`, read with torch's weights-only loader, so no code in them runs). Two architectures cover
the files A1111's users have:

- RRDBNet (ESRGAN): the original ESRGAN layout (`model.0.weight`, `model.1.sub.0.RDB1.conv1.0.weight`,
  ...), BasicSR's layout (`conv_first`, `body.0.rdb1.conv1`, ...; Real-ESRGAN's x4plus, x2plus and Anime6B,
  4x-UltraSharp, ...) and BSRGAN's (`RRDB_trunk`). Real-ESRGAN's x2 and x1 models take their input pixel-
  unshuffled; that is read off the first convolution's input channels.
- SRVGGNetCompact (Real-ESRGAN Compact: realesr-general-x4v3, realesr-animevideov3).

Names are A1111's: a file's stem in models/ESRGAN ("4x-UltraSharp"), and in models/RealESRGAN the name
A1111 gives the file it downloads there ("R-ESRGAN 4x+" for RealESRGAN_x4plus.pth), else the stem. The
scale is read off the weights. Pictures are fed as RGB in [0, 1], as Real-ESRGAN's own inference does
(A1111 feeds BGR), in tiles of 192 pixels with 8 pixels of overlap, so memory stays flat for any size.

No library is used for the networks: spandrel, which A1111 and ComfyUI load these files with, needs
torchvision, which cannot be installed beside the CPU build of torch this project pins.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .errors import InvalidRequestError, ModelLoadError

log = logging.getLogger(__name__)

UPSCALER_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")
# What A1111 calls the Real-ESRGAN files it downloads into models/RealESRGAN (infotexts carry these names).
REAL_ESRGAN_NAMES = {
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
    "realesrgan_x4plus": "R-ESRGAN 4x+",
    "realesrgan_x4plus_anime_6b": "R-ESRGAN 4x+ Anime6B",
    "realesrgan_x2plus": "R-ESRGAN 2x+",
}
# A1111's ESRGAN_tile and ESRGAN_tile_overlap defaults.
TILE_SIZE = 192
TILE_OVERLAP = 8
# A1111 runs the model at most this many times to reach the asked size (then resizes with Lanczos).
MAX_PASSES = 3
# Upscalers kept loaded: a full-size ESRGAN is about 67 MB.
MAX_LOADED_UPSCALERS = 2


@dataclass(frozen=True)
class UpscalerFile:
    """An upscaler model file; `name` is what A1111 lists and writes as "Hires upscaler"."""

    name: str
    path: Path


def scan_upscalers(esrgan_dir: Path, realesrgan_dir: Path) -> dict[str, UpscalerFile]:
    """The upscaler files of both folders (subfolders too), by name; the first of two same names wins."""
    found: dict[str, UpscalerFile] = {}
    for folder, known_names in ((esrgan_dir, {}), (realesrgan_dir, REAL_ESRGAN_NAMES)):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue
            if path.is_file() and path.suffix.lower() in UPSCALER_SUFFIXES:
                name = known_names.get(path.stem.lower(), path.stem)
                found.setdefault(name, UpscalerFile(name, path))
    return found


def choose(value, available: dict[str, UpscalerFile], built_in: tuple[str, ...], field: str, folders: str) -> str:
    """The canonical name of an upscaler choice (built-in or a model file, any case, with or without the file's
    extension); InvalidRequestError naming `field`, what there is and where models go otherwise."""
    text = str(value).strip() if value is not None else ""
    for name in (*built_in, *available):
        if text.lower() == name.lower():
            return name
    for name, upscaler in available.items():
        if text.lower() in (upscaler.path.name.lower(), upscaler.path.stem.lower()):
            return name
    listed = ", ".join([*built_in, *available])
    raise InvalidRequestError(field, value, f"one of {listed} (upscaler models are read from {folders})")


def scale_from_name(stem: str) -> int:
    """The scale a file's name states ("4x-UltraSharp", "RealESRGAN_x2plus"), else 4 (what A1111 lists for
    every ESRGAN file); the weights say for certain once loaded."""
    match = re.search(r"(?:^|[^0-9a-z])([1-8])x|x([1-8])(?:[^0-9]|$)", stem.lower())
    return int(match.group(1) or match.group(2)) if match else 4


# Networks ---------------------------------------------------------------------------------------


class _ResidualDenseBlock(nn.Module):
    """Five 3x3 convolutions, each seeing the block's input and every earlier output; the result is added
    back at a fifth of its size."""

    def __init__(self, features: int, growth: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, growth, 3, 1, 1)
        self.conv2 = nn.Conv2d(features + growth, growth, 3, 1, 1)
        self.conv3 = nn.Conv2d(features + 2 * growth, growth, 3, 1, 1)
        self.conv4 = nn.Conv2d(features + 3 * growth, growth, 3, 1, 1)
        self.conv5 = nn.Conv2d(features + 4 * growth, features, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            seen.append(F.leaky_relu(conv(torch.cat(seen, 1)), 0.2))
        return self.conv5(torch.cat(seen, 1)) * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, features: int, growth: int):
        super().__init__()
        self.rdb1 = _ResidualDenseBlock(features, growth)
        self.rdb2 = _ResidualDenseBlock(features, growth)
        self.rdb3 = _ResidualDenseBlock(features, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator (BasicSR's names): `upsamples` nearest 2x steps, after an optional pixel unshuffle
    by `unshuffle` (Real-ESRGAN's x2 and x1 models), so the scale is 2**upsamples / unshuffle."""

    def __init__(
        self, in_channels: int, out_channels: int, features: int, blocks: int, growth: int, upsamples: int, unshuffle
    ):
        super().__init__()
        self.unshuffle = unshuffle
        self.scale = 2**upsamples // unshuffle
        self.conv_first = nn.Conv2d(in_channels, features, 3, 1, 1)
        self.body = nn.Sequential(*[_RRDB(features, growth) for _ in range(blocks)])
        self.conv_body = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_up = nn.ModuleList(nn.Conv2d(features, features, 3, 1, 1) for _ in range(upsamples))
        self.conv_hr = nn.Conv2d(features, features, 3, 1, 1)
        self.conv_last = nn.Conv2d(features, out_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        if self.unshuffle > 1:
            # The unshuffle needs sides that are multiples of its factor: pad by reflection, crop after.
            pad_h, pad_w = -height % self.unshuffle, -width % self.unshuffle
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
            x = F.pixel_unshuffle(x, self.unshuffle)
        features = self.conv_first(x)
        features = features + self.conv_body(self.body(features))
        for conv in self.conv_up:
            features = F.leaky_relu(conv(F.interpolate(features, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(features), 0.2))
        return out[:, :, : height * self.scale, : width * self.scale]


class CompactNet(nn.Module):
    """Real-ESRGAN's SRVGGNetCompact: convolutions with PReLUs at the input's size, a pixel shuffle to
    `scale`, plus the input upscaled by nearest neighbour (the network learns the difference)."""

    def __init__(self, in_channels: int, out_channels: int, features: int, convs: int, scale: int):
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(in_channels, features, 3, 1, 1), nn.PReLU(features)]
        for _ in range(convs):
            layers += [nn.Conv2d(features, features, 3, 1, 1), nn.PReLU(features)]
        layers.append(nn.Conv2d(features, out_channels * scale * scale, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


# Reading files ----------------------------------------------------------------------------------

# The original ESRGAN layout and BSRGAN's, mapped onto BasicSR's names (the module's own).
_RENAMES = (
    (re.compile(r"^model\.0\.(weight|bias)$"), r"conv_first.\1"),
    (re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$"), r"body.\1.rdb\2.conv\3.\4"),
    (re.compile(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)$"), r"body.\1.rdb\2.conv\3.\4"),
    (re.compile(r"^trunk_conv\.(weight|bias)$"), r"conv_body.\1"),
    (re.compile(r"^upconv(\d)\.(weight|bias)$"), r"conv_up\1.\2"),
    (re.compile(r"^HRconv\.(weight|bias)$"), r"conv_hr.\1"),
)


def read_tensors(upscaler: UpscalerFile) -> dict[str, torch.Tensor]:
    """The file's table of tensors (BasicSR's `params_ema`/`params` nesting removed); ModelLoadError when it
    cannot be read or holds something else."""
    path = upscaler.path
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise many kinds for a broken or foreign file
        raise ModelLoadError(f"Upscaler {upscaler.name}: could not read {path} ({exc})") from exc
    for nesting in ("params_ema", "params", "state_dict", "model"):
        if isinstance(tensors, dict) and isinstance(tensors.get(nesting), dict):
            tensors = tensors[nesting]
            break
    if not isinstance(tensors, dict) or not tensors or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ModelLoadError(f"Upscaler {upscaler.name}: {path} holds no table of tensors")
    return tensors


def build_network(tensors: dict[str, torch.Tensor], name: str) -> RRDBNet | CompactNet:
    """The network these weights are for, with them loaded; ModelLoadError naming what it is not."""
    network = _build(tensors, name)
    if isinstance(network, CompactNet):
        channels = network.body[0].in_channels
    else:  # an unshuffling RRDBNet takes its picture's channels times the factor squared
        channels = network.conv_first.in_channels // network.unshuffle**2
    if channels != 3:
        raise ModelLoadError(f"Upscaler {name} takes {channels}-channel pictures; only RGB models are supported.")
    return network


def _build(tensors: dict[str, torch.Tensor], name: str) -> RRDBNet | CompactNet:
    if "body.0.weight" in tensors and "body.1.weight" in tensors and tensors["body.1.weight"].ndim == 1:
        return _compact(tensors, name)
    if any(".conv1x1." in key for key in tensors):
        raise ModelLoadError(f"Upscaler {name} is an ESRGAN+ model (conv1x1 layers), which is not supported.")
    if "model.0.weight" in tensors and "model.1.sub.0.RDB1.conv1.0.weight" in tensors:
        tensors = _from_original_layout(tensors)
    renamed = {}
    for key, tensor in tensors.items():
        for pattern, replacement in _RENAMES:
            key = pattern.sub(replacement, key)
        renamed[key] = tensor
    if not {"conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight"} <= set(renamed):
        shown = ", ".join(list(tensors)[:3])
        raise ModelLoadError(
            f"Upscaler {name} is not an ESRGAN, Real-ESRGAN or Real-ESRGAN Compact model (its first tensors: {shown}); "
            "other architectures (SwinIR, DAT, HAT, ...) are not supported."
        )
    return _rrdb(renamed, name)


def _from_original_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ESRGAN's original sequential layout: model.0 first conv, model.1 the trunk (its last entry the trunk's
    own conv), then [upsample, conv, activation] per 2x at 2-4, 5-7, ..., then the HR conv and the last conv."""
    indices = sorted({int(key.split(".")[1]) for key in tensors if re.match(r"^model\.\d+\.", key)})
    last = indices[-1]
    blocks = 1 + max(int(m.group(1)) for key in tensors if (m := re.match(r"^model\.1\.sub\.(\d+)\.RDB", key)))
    renamed = {}
    for key, tensor in tensors.items():
        index, rest = int(key.split(".")[1]), key.split(".", 2)[2]
        if index == 1 and rest.startswith(f"sub.{blocks}."):
            renamed["conv_body." + rest.rsplit(".", 1)[1]] = tensor
        elif index == last:
            renamed["conv_last." + rest] = tensor
        elif index == last - 2:
            renamed["conv_hr." + rest] = tensor
        elif index >= 3 and index % 3 == 0:
            renamed[f"conv_up{index // 3}.{rest}"] = tensor
        else:
            renamed[key] = tensor
    return renamed


def _rrdb(tensors: dict[str, torch.Tensor], name: str) -> RRDBNet:
    first, last = tensors["conv_first.weight"], tensors["conv_last.weight"]
    in_channels, out_channels = first.shape[1], last.shape[0]
    unshuffle = {out_channels * 4: 2, out_channels * 16: 4}.get(in_channels, 1)
    upsamples = sum(1 for key in tensors if re.match(r"^conv_up\d\.weight$", key))
    blocks = 1 + max(int(key.split(".")[1]) for key in tensors if key.startswith("body."))
    network = RRDBNet(
        in_channels,
        out_channels,
        features=first.shape[0],
        blocks=blocks,
        growth=tensors["body.0.rdb1.conv1.weight"].shape[0],
        upsamples=upsamples,
        unshuffle=unshuffle,
    )
    # BasicSR names its two upsampling convolutions conv_up1 and conv_up2; the module keeps a list.
    state = {re.sub(r"^conv_up(\d)\.", lambda m: f"conv_up.{int(m.group(1)) - 1}.", k): v for k, v in tensors.items()}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"Upscaler {name}: its weights do not make an ESRGAN network ({exc})") from exc
    return network


def _compact(tensors: dict[str, torch.Tensor], name: str) -> CompactNet:
    last = max(int(key.split(".")[1]) for key in tensors if key.startswith("body."))
    first = tensors["body.0.weight"]
    out_channels_total = tensors[f"body.{last}.weight"].shape[0]
    in_channels = first.shape[1]
    scale = int(round((out_channels_total / in_channels) ** 0.5))
    network = CompactNet(in_channels, in_channels, first.shape[0], convs=(last - 2) // 2, scale=scale)
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"Upscaler {name}: its weights do not make a Real-ESRGAN Compact network ({exc})") from exc
    return network


def load_network(upscaler: UpscalerFile) -> RRDBNet | CompactNet:
    network = build_network(read_tensors(upscaler), upscaler.name).eval().requires_grad_(False)
    log.info("Loaded upscaler %s (%dx) from %s", upscaler.name, network.scale, upscaler.path)
    return network


class LoadedUpscalers:
    """Upscaler networks loaded on one device, kept for the next job; shared by every user (they hold no
    per-job state)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._loaded: OrderedDict[str, nn.Module] = OrderedDict()
        # Requests are checked (and their upscaler loaded) on the callers' threads.
        self._lock = threading.Lock()

    def get(self, upscaler: UpscalerFile, field: str = "hr_upscaler") -> nn.Module:
        """The loaded network of `upscaler`; InvalidRequestError naming `field` when the file is no upscaler."""
        key = str(upscaler.path.resolve())
        with self._lock:
            if key not in self._loaded:
                try:
                    self._loaded[key] = load_network(upscaler).to(self.device)
                except ModelLoadError as exc:
                    raise InvalidRequestError(field, upscaler.name, f"an upscaler model that loads ({exc})") from exc
                while len(self._loaded) > MAX_LOADED_UPSCALERS:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(key)
            return self._loaded[key]

    def clear(self) -> None:
        """Let go of every loaded network (they load again on their next use)."""
        with self._lock:
            self._loaded.clear()


# Running ----------------------------------------------------------------------------------------


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return [*starts, length - tile]


def _tile_weights(start: int, length: int, total: int, fade: int) -> torch.Tensor:
    """Blending weights along one side of a tile (output pixels `start` to `start + length` of `total`). At an
    edge another tile overlaps, the first quarter of the `fade` is left out (there the tile's pixels saw its zero
    padding) and the weight then rises linearly over half of it, mirroring the neighbour's fall, so the two sum
    to 1; at the picture's own edges the weight stays 1."""
    centre = torch.arange(length, dtype=torch.float32) + 0.5
    weight = torch.ones(length)
    if fade > 0 and start > 0:
        weight = torch.minimum(weight, ((centre - fade / 4) / (fade / 2)).clamp(0, 1))
    if fade > 0 and start + length < total:
        weight = torch.minimum(weight, ((length - centre - fade / 4) / (fade / 2)).clamp(0, 1))
    return weight


def tile_count(height: int, width: int, tile: int = TILE_SIZE, overlap: int = TILE_OVERLAP) -> int:
    """How many network runs run_tiled makes for a picture of that size."""
    if height <= tile and width <= tile:
        return 1
    return len(_tile_starts(height, tile, overlap)) * len(_tile_starts(width, tile, overlap))


@torch.inference_mode()
def run_tiled(
    network: nn.Module, pixels: torch.Tensor, tile: int = TILE_SIZE, overlap: int = TILE_OVERLAP, on_tile=None
):
    """The network's output for `pixels` (1, C, H, W), computed in tiles of `tile` pixels that overlap by at least
    `overlap` and are blended linearly where they do. Where the network sees no further than a quarter of the
    overlap, the result is the whole picture's; beyond that (a full ESRGAN sees far) the blend hides the seams.
    `on_tile()`, when given, is called after each tile."""
    on_tile = on_tile or (lambda: None)
    scale = network.scale
    _, _, height, width = pixels.shape
    if height <= tile and width <= tile:
        out = network(pixels)
        on_tile()
        return out
    out = None
    weight_sum = torch.zeros(1, 1, height * scale, width * scale, device=pixels.device)
    for top in _tile_starts(height, tile, overlap):
        for left in _tile_starts(width, tile, overlap):
            piece = network(pixels[:, :, top : top + tile, left : left + tile])
            if out is None:
                out = torch.zeros(1, piece.shape[1], height * scale, width * scale, device=pixels.device)
            piece_h, piece_w = piece.shape[2:]
            fade = overlap * scale
            weight = torch.outer(
                _tile_weights(top * scale, piece_h, height * scale, fade),
                _tile_weights(left * scale, piece_w, width * scale, fade),
            ).to(pixels.device)
            rows = slice(top * scale, top * scale + piece_h)
            cols = slice(left * scale, left * scale + piece_w)
            out[:, :, rows, cols] += piece.float() * weight
            weight_sum[:, :, rows, cols] += weight
            on_tile()
    return out / weight_sum


def upscale_once(network: nn.Module, picture: Image.Image, on_tile=None) -> Image.Image:
    """One pass of the network over an RGB picture; `on_tile()` is called after each tile."""
    parameter = next(network.parameters())
    array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(parameter.device, parameter.dtype)
    out = run_tiled(network, pixels, on_tile=on_tile).float().clamp(0, 1)
    result = (out[0].permute(1, 2, 0) * 255.0).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(result, "RGB")


def planned_passes(scale: int, size: tuple[int, int], target: tuple[int, int]) -> list[tuple[int, int]]:
    """The (width, height) each of upscale_to's network passes starts from."""
    passes = []
    width, height = size
    while len(passes) < MAX_PASSES and (width < target[0] or height < target[1]):
        passes.append((width, height))
        if scale == 1:  # a 1x model (a denoiser, say) runs once
            break
        width, height = width * scale, height * scale
    return passes


def upscale_to(network: nn.Module, picture: Image.Image, width: int, height: int, on_tile=None) -> Image.Image:
    """`picture` at width x height as A1111's upscalers make it: the network runs (at most three times) until
    the picture is at least that size, then Lanczos brings it to exactly that size. A picture already that
    large is only resized. `on_tile(done, total)`, when given, counts the tiles of all passes as they finish."""
    passes = planned_passes(network.scale, picture.size, (width, height))
    total = sum(tile_count(pass_height, pass_width) for pass_width, pass_height in passes)
    done = 0

    def count_tile() -> None:
        nonlocal done
        done += 1
        if on_tile is not None:
            on_tile(done, total)

    for _ in passes:
        picture = upscale_once(network, picture, on_tile=count_tile)
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    return picture
