"""Text drawn on grids (the Compare tab's X/Y/Z grids, the prompt matrix): Pillow's own scalable font, and
labels wrapped to fit a cell."""

from __future__ import annotations

from PIL import ImageDraw, ImageFont


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def text_width(label_font, text: str) -> int:
    left, _top, right, _bottom = label_font.getbbox(text)
    return int(right - left)


def wrap(text: str, label_font, width: int) -> list[str]:
    """Long labels wrap onto more lines rather than run into the next column."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}".strip()
        if line and text_width(label_font, candidate) > width - 8:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    return lines


def centered(draw: ImageDraw.ImageDraw, text: str, box: tuple[int, int, int, int], label_font) -> None:
    """`text` wrapped to the box's width and centred in it, in black."""
    left, top, width, height = box
    lines = wrap(text, label_font, width)
    line_h = label_font.size + 2
    y = top + (height - line_h * len(lines)) / 2
    for text_line in lines:
        draw.text((left + (width - text_width(label_font, text_line)) / 2, y), text_line, fill="black", font=label_font)
        y += line_h
