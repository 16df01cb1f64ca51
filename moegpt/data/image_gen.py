"""Generated pictures with their descriptions, made here (no download): the two things the article
says GPT-4's vision is for, at a size a CPU trains on.

- ``screenshot``: a line of the bundled corpora (Shakespeare, or Python source) rendered with
  Pillow's built-in scalable font at a varied size, position, colour and background, wrapped as a
  text box wraps it; the answer is the line itself (runs of whitespace as one space).
- ``shapes``: a scene of 1-3 shapes of one kind and colour grouped in one cell of a 3x3 grid; the
  answer names the count, colour, shape and position ("2 red circles, top left").

Each picture is a pure function of its ``random.Random``: the data position is an index, so a
resumed run renders exactly the pictures an unbroken one would.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 220), "yellow": (235, 200, 20),
    "purple": (150, 40, 190), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
MAX_COUNT = 3
SHAPES_PROMPT = "Describe the shapes."
SCREENSHOT_PROMPT = "Transcribe the text."
MAX_LINE_CHARS = 32
MIN_LINE_CHARS = 4
FONT_SIZES = (10, 11, 12)
_SPACES = re.compile(r"\s+")
_SHAPES_ANSWER = re.compile(r"^(\d+) (\w+) (\w+), (\w+)(?: (\w+))?$")


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + ("es" if shape.endswith("s") else "s")


_SINGULAR = {plural(s, n): s for s in SHAPES for n in (1, 2)}


def _font(size: int):
    from PIL import ImageFont, features

    if not features.check("freetype2"):
        raise RuntimeError("rendering text needs Pillow built with FreeType (the PyPI wheels are)")
    return ImageFont.load_default(size=size)


def position_name(row: int, column: int) -> str:
    """The 3x3 cell's name: 'top left' ... 'center' ... 'bottom right'."""
    if (row, column) == (1, 1):
        return "center"
    return f"{ROWS[row]} {COLUMNS[column]}"


@dataclass(frozen=True)
class Scene:
    count: int
    colour: str
    shape: str
    position: str

    def answer(self) -> str:
        return f"{self.count} {self.colour} {plural(self.shape, self.count)}, {self.position}"

    @staticmethod
    def parse(text: str) -> "Scene | None":
        """An answer back into its fields; None when it does not read as one."""
        m = _SHAPES_ANSWER.match(text.strip())
        if not m:
            return None
        position = m[4] if m[5] is None else f"{m[4]} {m[5]}"
        return Scene(int(m[1]), m[2], _SINGULAR.get(m[3], m[3]), position)


def _background(rng: random.Random) -> tuple[int, int, int]:
    """A pale or a dark background, slightly tinted."""
    base = rng.randint(205, 255) if rng.random() < 0.75 else rng.randint(0, 45)
    return tuple(max(0, min(255, base + rng.randint(-12, 12))) for _ in range(3))


def _luma(c: tuple[int, int, int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # cross
        w = max(2, (x1 - x0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - w // 2, y0, cx - w // 2 + w, y1), fill=fill)
        draw.rectangle((x0, cy - w // 2, x1, cy - w // 2 + w), fill=fill)


def render_shapes(rng: random.Random, size: int):
    """-> (PIL image, Scene): 1-3 shapes of one kind and colour inside one cell of a 3x3 grid."""
    from PIL import Image, ImageDraw

    scene_row, scene_col = rng.randrange(3), rng.randrange(3)
    scene = Scene(rng.randint(1, MAX_COUNT), rng.choice(list(COLOURS)), rng.choice(SHAPES),
                  position_name(scene_row, scene_col))
    background = _background(rng)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cell = size // 3
    side = max(4, cell // 2 - 2)  # up to three shapes fit in a cell side by side or stacked
    slots = [(r, c) for r in range(2) for c in range(2)]  # a 2x2 layout inside the cell
    rng.shuffle(slots)
    jitter = max(1, cell // 2 - side)
    fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[scene.colour])
    for r, c in slots[:scene.count]:
        x = scene_col * cell + c * (cell // 2) + rng.randint(0, jitter)
        y = scene_row * cell + r * (cell // 2) + rng.randint(0, jitter)
        s = side - rng.randint(0, side // 4)
        _draw_shape(draw, scene.shape, (x, y, x + s - 1, y + s - 1), fill)
    return image, scene


def clean_line(line: str) -> str:
    """A corpus line as a screenshot shows it: whitespace runs as one space, ends stripped."""
    return _SPACES.sub(" ", line).strip()


def screenshot_lines(text: str) -> list[str]:
    """The lines of ``text`` a screenshot may show: printable ASCII, MIN_LINE_CHARS..MAX_LINE_CHARS long."""
    out = []
    for line in text.splitlines():
        line = clean_line(line)
        if MIN_LINE_CHARS <= len(line) <= MAX_LINE_CHARS and line.isascii() and line.isprintable():
            out.append(line)
    return out


def wrap(text: str, font, width: float) -> list[str]:
    """Lines as a text box shows ``text`` in ``width`` pixels: broken at spaces (which vanish), a word
    wider than the box broken inside it."""
    lines, current = [], ""
    for word in text.split(" "):
        candidate = word if not current else f"{current} {word}"
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for ch in word:  # a word on its own line, split where it overflows
            if current and font.getlength(current + ch) > width:
                lines.append(current)
                current = ""
            current += ch
    if current:
        lines.append(current)
    return lines


def render_screenshot(rng: random.Random, line: str, size: int):
    """-> PIL image of ``line`` wrapped into a ``size`` x ``size`` picture at a varied size, place and colour."""
    from PIL import Image, ImageDraw

    for font_size in sorted({rng.choice(FONT_SIZES), *FONT_SIZES}, reverse=True):
        font = _font(font_size)
        margin = rng.randint(1, 6)
        lines = wrap(line, font, size - margin - 2)
        height = font_size + 3
        if len(lines) * height + 2 <= size:
            break
    background = _background(rng)
    while True:
        ink = tuple(rng.randint(0, 255) for _ in range(3))
        if abs(_luma(ink) - _luma(background)) >= 110:
            break
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    widest = max(font.getlength(text) for text in lines)
    x = margin + rng.randint(0, max(0, int(size - margin - 2 - widest)))
    y = rng.randint(1, max(1, size - len(lines) * height - 1))
    for i, text in enumerate(lines):
        draw.text((x, y + i * height), text, fill=ink, font=font)
    return image


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_accuracy(predictions: list[str], truths: list[str]) -> float:
    """1 - (edits to turn every prediction into its truth) / (characters of the truths)."""
    edits = sum(edit_distance(p, t) for p, t in zip(predictions, truths, strict=True))
    return max(0.0, 1.0 - edits / max(1, sum(len(t) for t in truths)))
