"""Drawing the synthetic images: coloured shapes placed without overlap, and rendered words."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 30), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
KINDS = ("circle", "square", "triangle")
SIZE_RANGE = (0.20, 0.35)  # shape side as a fraction of the image side: a few cells of a 7x7 feature grid
GAP = 4  # pixels between shape boxes
WORDS = (
    "about above after again air all also animal answer apple area ask away baby back ball bank bear bed bell "
    "best bird black blue boat body book box boy bread bring brown build cake call car card care cat chair "
    "child city class clean clock close cloud cold come cook corn cow cup dark day deep desk dog door down "
    "draw dream dress drink duck early earth east eat egg end eye face fall farm fast fire fish five flag "
    "floor flower fly food foot fox friend frog fruit game garden girl give glass gold good grass green hand "
    "happy hat head heart help hill home horse house ice idea iron jump key king kite lake lamp land large "
    "leaf left letter light line lion long map milk moon mouse music name near nest new night north nose "
    "ocean old open orange page paper park pen pig plant play queen quick rain read red ring river road rock "
    "room rose run salt sand school sea seed sheep ship shoe sing sky sleep small snow song south star stone "
    "street sun table tall tea tiger time top town train tree water west white wind window winter wolf wood "
    "word world year yellow young zebra"
).split()


@dataclass
class Shape:
    """One drawn shape: its colour and kind words and its bounding square in pixels."""
    colour: str
    kind: str
    x0: int  # top-left corner of the bounding square
    y0: int
    size: int  # side of the bounding square, pixels

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Inclusive pixel box (x0, y0, x1, y1)."""
        return self.x0, self.y0, self.x0 + self.size - 1, self.y0 + self.size - 1

    @property
    def centre(self) -> tuple[int, int]:
        """A pixel inside the shape for every kind (the triangle included)."""
        return self.x0 + self.size // 2, self.y0 + self.size // 2

    @property
    def name(self) -> str:
        """"red circle": how questions and captions name it."""
        return f"{self.colour} {self.kind}"

    def to_dict(self) -> dict[str, Any]:
        """The shape as written to images.json (centre and inclusive box)."""
        return {"colour": self.colour, "kind": self.kind, "centre": list(self.centre), "size": self.size,
                "box": list(self.box)}


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] + GAP < b[0] or b[2] + GAP < a[0] or a[3] + GAP < b[1] or b[3] + GAP < a[1]


def place_shapes(rng: random.Random, k: int, side: int) -> list[Shape]:
    """k shapes with distinct (colour, kind), non-overlapping boxes; redraws the whole set if one won't fit."""
    combos = [(c, kind) for c in COLOURS for kind in KINDS]
    lo, hi = round(SIZE_RANGE[0] * side), round(SIZE_RANGE[1] * side)
    while True:
        shapes: list[Shape] = []
        for colour, kind in rng.sample(combos, k):
            for _ in range(100):
                size = rng.randint(lo, hi)
                s = Shape(colour, kind, rng.randint(2, side - size - 2), rng.randint(2, side - size - 2), size)
                if all(_apart(s.box, t.box) for t in shapes):
                    shapes.append(s)
                    break
            else:
                break
        if len(shapes) == k:
            return shapes


def draw_shapes(shapes: list[Shape], side: int, background: tuple[int, int, int]) -> Image.Image:
    """The shapes in flat colours on a square image, without anti-aliasing (so pixels check answers)."""
    img = Image.new("RGB", (side, side), background)
    d = ImageDraw.Draw(img)
    for s in shapes:
        x0, y0, x1, y1 = s.box
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            d.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            d.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


_FONTS: dict[int, Any] = {}


def _font(size: int) -> Any:
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except (ImportError, TypeError, OSError) as e:
            raise RuntimeError(f"OCR images need Pillow >= 10.1 built with FreeType "
                               f"(ImageFont.load_default(size=...)): {e}") from e
    return _FONTS[size]


def draw_word(rng: random.Random, word: str, side: int) -> tuple[Image.Image, dict[str, Any]]:
    """Black text on white, binary (no anti-aliasing), random size and position that fit the image."""
    size = rng.randint(round(0.12 * side), round(0.22 * side))
    img = Image.new("RGB", (side, side), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.fontmode = "1"
    while True:
        # ints for a FreeType font (Pillow types the box as floats for all fonts)
        left, top, right, bottom = map(int, d.textbbox((0, 0), word, font=_font(size)))
        if right - left <= side - 8 and bottom - top <= side - 8:
            break
        size -= 2
    x = rng.randint(4, side - 4 - (right - left)) - left
    y = rng.randint(4, side - 4 - (bottom - top)) - top
    d.text((x, y), word, fill=(0, 0, 0), font=_font(size))
    ink = ImageOps.invert(img.convert("L")).getbbox()  # the drawn pixels, exclusive right/bottom
    assert ink is not None, word
    return img, {"word": word, "font_size": size, "box": [ink[0], ink[1], ink[2] - 1, ink[3] - 1]}  # inclusive
