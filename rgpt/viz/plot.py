"""Attention heatmaps as pictures (Pillow): one head with its tokens on both axes, or a layer's heads in a
grid, for the inspect command's PNG and the trainer's TensorBoard images. Chinese needs a CJK font: the
system's is found (Noto CJK, WenQuanYi, Source Han, PingFang, Microsoft YaHei, ...) or one is named; without
one a notice says so and the labels come out as empty boxes.
"""

import functools
import glob
import os
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rgpt.viz.lens import display_token

NO_FONT = (
    "notice: no CJK font found, so Chinese labels in the picture will be empty boxes; install one "
    "(Debian/Ubuntu: apt-get install fonts-noto-cjk; Fedora: google-noto-sans-cjk-fonts) or name a font "
    "file with font=PATH"
)
# where CJK fonts live when fontconfig's fc-list is not there to ask
FONT_GLOBS = (
    "/usr/share/fonts/**/NotoSansCJK*",
    "/usr/share/fonts/**/NotoSerifCJK*",
    "/usr/share/fonts/**/SourceHanSans*",
    "/usr/share/fonts/**/wqy*",
    "/usr/share/fonts/**/droid/DroidSansFallback*",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti*",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/msyh.tt*",
    "C:/Windows/Fonts/simhei.ttf",
)


def _fc_list() -> list[str]:
    """Font files fontconfig says cover Chinese (empty without fc-list)."""
    if shutil.which("fc-list") is None:
        return []
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split(":")[0].strip() for line in out.stdout.splitlines() if line.strip()]


def _preference(path: str) -> tuple:
    """Sans before serif, regular before bold, simplified-Chinese families first."""
    name = os.path.basename(path).lower()
    return ("serif" in name, "bold" in name or "light" in name or "thin" in name, "mono" in name, name)


@functools.cache
def find_cjk_font() -> tuple[str, int] | None:
    """(font file, face index) of a CJK font on this system, preferring a simplified-Chinese face."""
    found = _fc_list() or [f for pattern in FONT_GLOBS for f in glob.glob(pattern, recursive=True)]
    for path in sorted(set(found), key=_preference):
        face = _simplified_face(path)
        if face is not None:
            return path, face
    return None


def _simplified_face(path: str) -> int | None:
    """The index of the face of a font file (a .ttc holds several) named for simplified Chinese, else 0;
    None when Pillow cannot read it."""
    faces = []
    for index in range(32):
        try:
            faces.append(" ".join(ImageFont.truetype(path, 12, index=index).getname()))
        except OSError:
            break
    if not faces:
        return None
    return next((i for i, name in enumerate(faces) if " SC" in name and "Mono" not in name), 0)


@dataclass
class Fonts:
    label: ImageFont.FreeTypeFont | ImageFont.ImageFont
    title: ImageFont.FreeTypeFont | ImageFont.ImageFont
    cjk: bool  # False: a fallback without Chinese glyphs


def load_fonts(font: str | None = None, size: int = 14, log=print) -> Fonts:
    """The fonts for labels and titles: `font` (a file) if given, else the system's CJK font, else Pillow's
    default with NO_FONT logged."""
    where = (font, 0) if font else find_cjk_font()
    if where is not None:
        path, index = where
        if font:
            index = _simplified_face(path)
            if index is None:
                raise ValueError(f"font={path}: not a font file Pillow can read")
        return Fonts(
            ImageFont.truetype(path, size, index=index), ImageFont.truetype(path, size + 2, index=index), True
        )
    log(NO_FONT)
    return Fonts(ImageFont.load_default(size), ImageFont.load_default(size + 2), False)


# a perceptually even ramp from white (no attention) through blue to near black (all of it)
RAMP = np.array(
    [[255, 255, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107], [3, 19, 43]]
)


def colours(values: np.ndarray) -> np.ndarray:
    """Weights in [0, 1] -> RGB uint8 along RAMP (same shape plus a last axis of 3)."""
    x = np.clip(values, 0.0, 1.0) * (len(RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(RAMP) - 2)
    frac = (x - lo)[..., None]
    return (RAMP[lo] * (1 - frac) + RAMP[lo + 1] * frac).round().astype(np.uint8)


def _text_size(draw, text, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _vertical_label(text: str, font, cell: int) -> Image.Image:
    """A key label for the top axis: Chinese stacked one character a line (how vertical Chinese is read),
    anything else (<bos>, Latin) turned 90 degrees."""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    if text.isascii():
        w, h = _text_size(probe, text, font)
        img = Image.new("L", (w + 4, cell), 0)
        ImageDraw.Draw(img).text((2, (cell - h) // 2), text, fill=255, font=font, anchor="lt")
        return img.rotate(90, expand=True)
    line = max(_text_size(probe, c, font)[1] for c in text) + 2
    img = Image.new("L", (cell, line * len(text) + 2), 0)
    d = ImageDraw.Draw(img)
    for i, c in enumerate(text):
        d.text((cell // 2, 1 + i * line), c, fill=255, font=font, anchor="mt")
    return img


def head_image(att: np.ndarray, tokens: list[str], title: str, fonts: Fonts, cell: int = 22) -> Image.Image:
    """One head's (T, T) attention as a heatmap: queries (each position) down the left, the keys they look
    at along the top, darker = more attention, with a title and a 0-1 scale."""
    T = att.shape[0]
    labels = [display_token(t) for t in tokens]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max(_text_size(probe, s, fonts.label)[0] for s in labels) + 10
    tops = [_vertical_label(s, fonts.label, cell) for s in labels]
    top_h = max(t.height for t in tops) + 6
    title_h = _text_size(probe, title, fonts.title)[1] + 14
    axis_h = 24  # the axis captions
    width = max(left + T * cell + 70, _text_size(probe, title, fonts.title)[0] + 20)
    height = title_h + axis_h + top_h + T * cell + 28
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 6), title, fill="black", font=fonts.title)
    x0, y0 = left, title_h + axis_h + top_h
    d.text((x0, title_h), "键 key: 被看的词 →", fill=(90, 90, 90), font=fonts.label)
    heat = colours(att).repeat(cell, 0).repeat(cell, 1)  # (T*cell, T*cell, 3)
    img.paste(Image.fromarray(heat), (x0, y0))
    for i, s in enumerate(labels):  # queries on the left, keys on top
        d.text((x0 - 6, y0 + i * cell + cell // 2), s, fill="black", font=fonts.label, anchor="rm")
        t = tops[i]
        img.paste((0, 0, 0), (x0 + i * cell + (cell - t.width) // 2, y0 - 4 - t.height), t)
    d.rectangle((x0 - 1, y0 - 1, x0 + T * cell, y0 + T * cell), outline=(120, 120, 120))
    bar_x, bar_h = x0 + T * cell + 14, T * cell  # the colour scale, 1 at the top
    ramp = colours(np.linspace(1, 0, bar_h))[:, None, :].repeat(12, 1)
    img.paste(Image.fromarray(ramp), (bar_x, y0))
    d.text((bar_x + 16, y0), "1", fill="black", font=fonts.label, anchor="lt")
    d.text((bar_x + 16, y0 + bar_h), "0", fill="black", font=fonts.label, anchor="lb")
    d.text((6, y0 + T * cell + 4), "↑ 查询 query: 当前位置", fill=(90, 90, 90), font=fonts.label, anchor="lt")
    return img


def grid_image(images: list[Image.Image], columns: int = 4) -> Image.Image:
    """Pictures of equal size side by side, `columns` a row (a layer's heads in one TensorBoard image)."""
    w, h = max(i.width for i in images), max(i.height for i in images)
    rows = -(-len(images) // columns)
    out = Image.new("RGB", (w * min(columns, len(images)), h * rows), "white")
    for k, img in enumerate(images):
        out.paste(img, ((k % columns) * w, (k // columns) * h))
    return out


def layer_images(att, tokens: list[str], fonts: Fonts) -> list[np.ndarray]:
    """Per layer, its heads' heatmaps in one (height, width, 3) uint8 picture; att: (L, H, T, T)."""
    out = []
    for layer, heads in enumerate(att):
        pics = [head_image(a.numpy(), tokens, f"层 {layer} 头 {h}", fonts) for h, a in enumerate(heads)]
        out.append(np.asarray(grid_image(pics)))
    return out


def save_png(img: Image.Image, path) -> None:
    """Write a PNG atomically (a temporary file, then a rename)."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
