"""The embedded default provider: renders a real image from the prompt, with no network.

The picture is a deterministic function of (prompt, seed, index): its palette comes from the
prompt, its composition from all three, and the prompt is written on it.
"""

import functools
import hashlib
import io
import random
import textwrap
import time

from PIL import Image, ImageDraw, ImageFont

from app.core.config import Settings
from app.providers.base import GeneratedImage, ImageRequest, ImageStopped

IMAGE_SIZE = 512


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _palette(prompt: str) -> list[tuple[int, int, int]]:
    rng = _rng("palette", prompt)
    base_hue = rng.random()
    colours = []
    for step in range(5):
        hue = (base_hue + step * rng.uniform(0.08, 0.22)) % 1.0
        colours.append(_hsv(hue, rng.uniform(0.45, 0.9), rng.uniform(0.55, 0.98)))
    return colours


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


# Drawing costs this process ~6 ms of CPU that a real provider spends on its own machines; the
# picture is a function of its arguments, so a repeated one is not drawn again.
@functools.lru_cache(maxsize=64)
def render_image(prompt: str, seed: int | None, index: int) -> bytes:
    """A PNG of IMAGE_SIZE² pixels that depends visibly on the prompt."""
    palette = _palette(prompt)
    rng = _rng("layout", prompt, seed, index)
    top, bottom = palette[0], palette[1]
    # A one-pixel-wide vertical gradient, stretched: far cheaper than blending two images.
    column = Image.new("RGB", (1, IMAGE_SIZE))
    gradient = [
        tuple(round(a + (b - a) * y / (IMAGE_SIZE - 1)) for a, b in zip(top, bottom, strict=True))
        for y in range(IMAGE_SIZE)
    ]
    column.putdata(gradient)
    image = column.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image, "RGBA")
    for _ in range(rng.randint(6, 14)):
        colour = (*rng.choice(palette[2:]), rng.randint(90, 200))
        x, y = rng.randint(-64, IMAGE_SIZE), rng.randint(-64, IMAGE_SIZE)
        w, h = rng.randint(40, 260), rng.randint(40, 260)
        if rng.random() < 0.6:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        else:
            points = [(x + rng.randint(0, w), y + rng.randint(0, h)) for _ in range(3)]
            draw.polygon(points, fill=colour)

    font = ImageFont.load_default(size=24)
    lines = textwrap.wrap(prompt, width=36)[:4] or [""]
    band_top = IMAGE_SIZE - 24 - 30 * len(lines)
    draw.rectangle((0, band_top, IMAGE_SIZE, IMAGE_SIZE), fill=(0, 0, 0, 140))
    for row, line in enumerate(lines):
        draw.text((16, band_top + 12 + 30 * row), line, font=font, fill=(255, 255, 255, 255))
    draw.text((IMAGE_SIZE - 64, 12), f"#{index + 1}", font=font, fill=(255, 255, 255, 230))

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class LocalProvider:
    name = "local"
    limits_creates = False
    model = "myflix-local-renderer"

    def __init__(self, latency_ms: int, jitter_ms: int) -> None:
        self._latency_ms = latency_ms
        self._jitter_ms = jitter_ms
        # The first picture imports PIL's image plugins and loads its font, holding the GIL
        # for a while: here, at startup, rather than in the first request's images.
        render_image("", None, 0)

    def generate(self, request: ImageRequest) -> GeneratedImage:
        jitter = random.uniform(-self._jitter_ms, self._jitter_ms) if self._jitter_ms else 0.0
        # From dispatch, not from when this thread got going: a busy pool must not stretch it.
        deadline = request.dispatched_at + max(0.0, (self._latency_ms + jitter) / 1000)
        content = render_image(request.prompt, request.seed, request.index)
        # Like a real model, the image arrives after the configured latency (rendering
        # included); a stop ends the wait at once.
        if request.stop.wait(max(0.0, deadline - time.monotonic())):
            raise ImageStopped
        return GeneratedImage(content=content)

    def prepare_thread(self) -> None:
        pass

    def close(self) -> None:
        pass


def create_provider(settings: Settings) -> LocalProvider:
    return LocalProvider(settings.LOCAL_LATENCY_MS, settings.LOCAL_LATENCY_JITTER_MS)
