"""The procedural "shapes" dataset the micro model learns from, and the classifier that grades its images.

One shape (circle, square, triangle) in one palette colour on a background of another, at a random
place and size; captions in many templates, both sentences and the comma-separated tag style. Every
draw comes from a seeded generator, so a dataset is a pure function of its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

# CSS named colours: what a user means by the word.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOURS = list(PALETTE)
SHAPES = ["circle", "square", "triangle"]
SIZES = ["small", "large"]
IMAGE_SIZE = 64
# Side of the shape's bounding box in pixels, per size word; the largest square still covers less
# than half the picture, so the background stays the most common colour.
SIZE_RANGES = {"small": (14, 24), "large": (30, 40)}
# Drawn larger then reduced, so edges are anti-aliased like a real picture's.
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeScene:
    shape: str
    colour: str
    background: str
    size: str
    box: tuple[int, int, int, int]  # left, top, right, bottom in image pixels


def random_scene(rng: random.Random) -> ShapeScene:
    shape = rng.choice(SHAPES)
    colour = rng.choice(COLOURS)
    background = rng.choice([c for c in COLOURS if c != colour])
    size = rng.choice(SIZES)
    side = rng.randint(*SIZE_RANGES[size])
    left = rng.randint(2, IMAGE_SIZE - side - 2)
    top = rng.randint(2, IMAGE_SIZE - side - 2)
    return ShapeScene(shape, colour, background, size, (left, top, left + side, top + side))


def _draw_shape(image: Image.Image, scene: ShapeScene, fill) -> None:
    """Draws `scene`'s shape on a supersampled canvas."""
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = (v * SUPERSAMPLE for v in scene.box)
    if scene.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)


def draw_scene(scene: ShapeScene) -> Image.Image:
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    _draw_shape(image, scene, PALETTE[scene.colour])
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def shape_coverage(scene: ShapeScene, side: int) -> np.ndarray:
    """How much of each cell of a `side`x`side` grid over the picture the shape covers, 0 to 1
    (a float32 [side, side] array; at the latent grid's side, which latent pixels are the shape's)."""
    big = IMAGE_SIZE * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    _draw_shape(mask, scene, 255)
    return np.asarray(mask.reduce(big // side), dtype=np.float32) / 255.0


def make_images(count: int, seed: int) -> tuple[list[ShapeScene], np.ndarray]:
    """`count` scenes and their pictures as a uint8 array [count, 64, 64, 3]."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    pixels = np.stack([np.asarray(draw_scene(scene)) for scene in scenes])
    return scenes, pixels


# Captions -------------------------------------------------------------------------------------

# {c} shape colour, {s} shape, {b} background colour, {z} size; {a} is "a"/"an" for the next word.
FULL_TEMPLATES = [
    "{a:c} {c} {s} on a {b} background",
    "a {b} background with {a:c} {c} {s}",
    "a {z} {c} {s} on a {b} background",
    "{c} {s} on {b} background",
    "an image of {a:c} {c} {s}, {b} background",
    "{a:c} {c} {s} in front of a {b} background",
    "a {b} background and a {z} {c} {s}",
    "a simple drawing of {a:c} {c} {s} on a {b} background",
    "there is {a:c} {c} {s} on a {b} background",
    "{c} {s}, {b} background, simple",
    "{b} background, {c} {s}",
    "{c} {s}, {z}, {b} background, flat colors, minimal",
    "{z} {c} {s}, {b} background",
    "a picture with a {b} background and {a:c} {c} {s} in it",
]
# Captions naming only some attributes, so each word also means something alone ("red" as a
# negative prompt, "a circle" without a colour).
PARTIAL_TEMPLATES = [
    "{a:c} {c} {s}",
    "a {s} on a {b} background",
    "{c} {s}",
    "a {b} background",
    "{b} background",
    "a {s}",
    "{s}",
    "{c}",
    "{a:c} {c} shape on a {b} background",
    "a {z} {s}",
    "{c} shape",
]
CAPTION_DROPOUT = 0.1
PARTIAL_SHARE = 0.2


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def fill_template(template: str, scene: ShapeScene) -> str:
    words = {"c": scene.colour, "s": scene.shape, "b": scene.background, "z": scene.size}
    text = template.replace("{a:c}", _article(scene.colour))
    return text.format(**words)


def named_attributes(template: str) -> dict[str, bool]:
    """Which of the scene's attributes a template states (its caption supervises only those)."""
    return {
        "colour": "{c}" in template and "{s}" in template or "{c} shape" in template,
        "shape": "{s}" in template,
        "background": "{b}" in template,
        "size": "{z}" in template,
    }


def random_caption(
    scene: ShapeScene, rng: random.Random, templates: list[str] | None = None, dropout: float = CAPTION_DROPOUT
) -> tuple[str, str]:
    """A caption for `scene` and the template it came from ("" for a dropped caption, in `dropout` of them)."""
    roll = rng.random()
    if roll < dropout:
        return "", ""
    # Partial captions keep their share of the captions that are not dropped, whatever `dropout` is.
    if templates is None and roll < dropout + PARTIAL_SHARE * (1 - dropout) / (1 - CAPTION_DROPOUT):
        template = rng.choice(PARTIAL_TEMPLATES)
    else:
        template = rng.choice(templates or FULL_TEMPLATES)
    return fill_template(template, scene), template


# Emphasis: some captions weight a colour word as A1111's "(red:1.3)" does, and the picture they come
# with is one whose colour areas agree: a heavier shape colour goes with a larger shape, a heavier
# background colour with a smaller one. The model learns what a token's weight means, while the
# weighting itself is the engine's, applied to the encoder output exactly as at generation time.
EMPHASIS_RANGE = (0.5, 1.5)


def size_rank(scene: ShapeScene, size_named: bool) -> float:
    """Where the shape's size sits, 0 (smallest) to 1 (largest): among the sizes its size word allows
    when the caption names it, among all sizes when it does not."""
    low, high = SIZE_RANGES[scene.size]
    within = (scene.box[2] - scene.box[0] - low) / (high - low)
    return within if size_named else (SIZES.index(scene.size) + within) / len(SIZES)


def emphasis_weights(scene: ShapeScene, template: str, rng: random.Random, share: float) -> dict[str, float]:
    """Weights for colour words of the caption made from `template` that agree with `scene`'s areas,
    each named colour word weighted in `share` of captions (words left at 1.0 are not listed)."""
    named = named_attributes(template)
    rank = size_rank(scene, named["size"])
    low, high = EMPHASIS_RANGE
    weights = {}
    if "{c}" in template and rng.random() < share:
        weights[scene.colour] = low + (high - low) * rank
    if named["background"] and rng.random() < share:
        weights[scene.background] = high - (high - low) * rank
    return weights


# Low-noise training pairs a picture with a caption of other colours, so the model learns what
# img2img at a low denoising strength needs: with little noise the picture's own colours win over the
# prompt's. (The data otherwise never contradicts its captions, and the model follows the text even
# one tenth of the way from the finished picture.)
RECOLOUR_SHARE = 0.2
RECOLOUR_BACKGROUND_SHARE = 0.5  # of those recoloured captions, the share that name another background too
LOW_NOISE_STEPS = 200  # of 1,000 training timesteps: denoising strengths up to 0.2


def recoloured(
    scene: ShapeScene, rng: random.Random, background_share: float = RECOLOUR_BACKGROUND_SHARE
) -> ShapeScene:
    """`scene` with another shape colour and, `background_share` of the time, another background colour."""
    background = scene.background
    # The coin is tossed whatever the share, as it always was, so the default share draws what runs
    # drew before the share could be set.
    if rng.random() < background_share:
        background = rng.choice([c for c in COLOURS if c != scene.background])
    colour = rng.choice([c for c in COLOURS if c not in (scene.colour, background)])
    return ShapeScene(scene.shape, colour, background, scene.size, scene.box)


# Grading ----------------------------------------------------------------------------------------

# Fill ratios that separate the shapes: square 1.0, circle 0.785, triangle 0.5 when drawn; decoded
# pictures have softer corners, so the cut-offs sit where the VAE's round trips of 300 training
# pictures are read best (94% right, which is the ceiling any generated picture is judged against).
SQUARE_FILL = 0.86
CIRCLE_FILL = 0.74

_PALETTE_ARRAY = np.array(list(PALETTE.values()), dtype=np.float32)


def nearest_palette(pixels: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the nearest palette colour for each pixel of an [H, W, 3] array."""
    flat = pixels.reshape(-1, 3).astype(np.float32)
    distances = ((flat[:, None, :] - _PALETTE_ARRAY[None, :, :]) ** 2).sum(-1)
    return distances.argmin(1).reshape(pixels.shape[:2])


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str
    shape: str
    fill_ratio: float
    colour_share: dict[str, float]


def classify(image: Image.Image) -> Reading:
    """Background = most common palette colour, shape colour = second, shape from how much of its
    bounding box the shape fills (square 1.0, circle 0.79, triangle 0.5)."""
    reading = _palette_reading(image)
    drawn, box = reading.drawn, reading.box
    fill = 0.0 if box is None else float(drawn.sum() / ((box[2] - box[0]) * (box[3] - box[1])))
    shape = "square" if fill > SQUARE_FILL else "circle" if fill > CIRCLE_FILL else "triangle"
    share = {name: float(reading.counts[i] / drawn.size) for i, name in enumerate(COLOURS)}
    return Reading(COLOURS[reading.background], COLOURS[reading.colour], shape, fill, share)


def outline_match(image: Image.Image, shape: str) -> float:
    """How closely the picture's shape (its pixels of the second most common palette colour) matches
    `shape` drawn exactly in the same bounding box, as intersection over union, 0 to 1.

    The fill ratio tells the shapes apart but not how well each is drawn: any blob filling less than
    CIRCLE_FILL of its box reads as a triangle. This says how clean the outline is: the training
    pictures' shapes match their own shape by 0.93 or more (median 0.98 to 1.0) and another shape by
    0.83 at most (a circle against a square in its box, about 0.8; against a triangle, about 0.5)."""
    reading = _palette_reading(image)
    drawn, box = reading.drawn, reading.box
    if box is None:
        return 0.0
    ideal = shape_coverage(ShapeScene(shape, "white", "black", "small", box), IMAGE_SIZE) >= 0.5
    return float((drawn & ideal).sum() / (drawn | ideal).sum())


class _PaletteReading(NamedTuple):
    counts: np.ndarray  # pixels of each palette colour
    background: int  # index of the most common colour
    colour: int  # index of the second, the shape's
    drawn: np.ndarray  # [H, W] bool: the shape colour's pixels
    box: tuple[int, int, int, int] | None  # their bounding box


def _palette_reading(image: Image.Image) -> _PaletteReading:
    """The picture at the dataset's size reduced to the palette, with its shape's pixels and their box."""
    labels = nearest_palette(np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))))
    counts = np.bincount(labels.ravel(), minlength=len(COLOURS))
    order = np.argsort(-counts, kind="stable")
    drawn = labels == order[1]
    return _PaletteReading(counts, int(order[0]), int(order[1]), drawn, _bounding_box(drawn))


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Left, top, right, bottom (exclusive) of a boolean mask's pixels, as in ShapeScene.box; None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
