"""Render SVGs and images onto a white square PNG of a fixed size."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageStat

from mmserve.fileio import atomic_write

Image.MAX_IMAGE_PIXELS = None  # some openclipart PNGs are huge pages

ALPHA_THRESHOLD = 8  # alpha below this counts as empty when cropping


class RenderError(ValueError):
    """An SVG or image could not be turned into a usable picture."""


def crop_to_alpha(img: Image.Image) -> Image.Image:
    """Crop an RGBA image to the bounding box of its visible (non-transparent) pixels."""
    alpha = img.getchannel("A").point(lambda a: 255 if a >= ALPHA_THRESHOLD else 0)
    box = alpha.getbbox()
    if box is None:
        raise RenderError("image is fully transparent")
    return img.crop(box)


def to_white_square(img: Image.Image, size: int, crop_alpha: bool = False, margin: float = 0.0) -> Image.Image:
    """Composite on white, pad onto a centred white square (plus a margin) and resize to `size` px."""
    if img.mode in ("P", "LA", "L") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGBA":
        img = img.convert("RGB").convert("RGBA")
    if crop_alpha:
        img = crop_to_alpha(img)
    w, h = img.size
    if w == 0 or h == 0:
        raise RenderError("image has zero size")
    side = int(round(max(w, h) * (1.0 + 2.0 * margin)))
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(img, ((side - w) // 2, (side - h) // 2))
    out = canvas.convert("RGB")
    if side != size:
        out = out.resize((size, size), Image.Resampling.LANCZOS)
    return out


def is_blank(img: Image.Image, min_std: float = 1.0) -> bool:
    """Whether an image is (almost) a single flat colour: a failed render."""
    stat = ImageStat.Stat(img.convert("L"))
    return stat.stddev[0] < min_std


def _resvg(svg: str, **dims: int) -> Image.Image:
    """Rasterise SVG markup with resvg at a given width or height."""
    import resvg_py

    try:
        png = resvg_py.svg_to_bytes(svg_string=svg, **dims)
    except Exception as exc:  # resvg raises ValueError/RuntimeError variants
        raise RenderError(f"resvg failed: {exc}") from exc
    img = Image.open(io.BytesIO(bytes(png)))
    img.load()
    return img


def render_svg(svg: str, size: int, margin: float = 0.0) -> Image.Image:
    """Render SVG markup with resvg at `size` px and return it on a white square."""
    img = _resvg(svg, width=size)
    if img.height > size:  # tall drawing: fit the height instead
        img = _resvg(svg, height=size)
    out = to_white_square(img, size, margin=margin)
    if is_blank(out):
        raise RenderError("render is blank")
    return out


def save_png(img: Image.Image, path: Path) -> None:
    """Save an RGB PNG atomically (write a temp file then rename)."""
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", optimize=False))


def crop_to_content(img: Image.Image) -> Image.Image:
    """Crop to visible pixels: the alpha bounding box, or the non-white box of an image without alpha."""
    if img.mode in ("P", "LA") or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA" and img.getchannel("A").getextrema()[0] < 255:
        return crop_to_alpha(img)
    rgb = img.convert("RGB")
    diff = ImageChops.difference(rgb, Image.new("RGB", rgb.size, (255, 255, 255))).convert("L")
    box = diff.point(lambda v: 255 if v > 16 else 0).getbbox()
    if box is None:
        raise RenderError("image is blank white")
    return rgb.crop(box)


def render_raster(path: Path, size: int, margin: float = 0.04, min_side: int = 16) -> Image.Image:
    """Load a PNG, crop it to its content, composite on white and pad/resize to a `size` px square."""
    with Image.open(path) as img:
        img.load()
        content = crop_to_content(img)
    if max(content.size) < min_side:
        raise RenderError(f"content is only {content.size[0]}x{content.size[1]} px")
    out = to_white_square(content, size, margin=margin)
    if is_blank(out):
        raise RenderError("picture is blank")
    return out


_SVG_TAG = re.compile(r"<svg\b[^>]*>", re.S)
_LENGTH = re.compile(r"^\s*([0-9.]+)\s*(px|pt|pc|mm|cm|in)?\s*$")
_PX_PER_UNIT = {None: 1.0, "px": 1.0, "pt": 4 / 3, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0}


def fix_svg_size(svg: str) -> str:
    """Give a root <svg> without viewBox one in px user units (resvg rejects e.g. width="128pt" alone)."""
    m = _SVG_TAG.search(svg)
    if m is None or "viewBox" in m.group(0):
        return svg
    tag = m.group(0)
    dims = {}
    for key in ("width", "height"):
        a = re.search(rf'\s{key}\s*=\s*["\']([^"\']*)["\']', tag)
        length = _LENGTH.match(a.group(1)) if a else None
        if length is None:
            return svg
        dims[key] = float(length.group(1)) * _PX_PER_UNIT[length.group(2)]
        tag = tag.replace(a.group(0), f' {key}="{dims[key]:.3f}"')
    tag = tag[:-1].rstrip("/") + f' viewBox="0 0 {dims["width"]:.3f} {dims["height"]:.3f}">'
    if m.group(0).endswith("/>"):
        tag = tag[:-1] + "/>"
    return svg[:m.start()] + tag + svg[m.end():]


def render_svg_file(path: Path, size: int, margin: float = 0.04) -> Image.Image:
    """Render an SVG file: cairosvg when installed, else resvg; crop to content and pad to a white square."""
    try:
        import cairosvg
    except (ImportError, OSError):
        cairosvg = None
    if cairosvg is not None:
        png = cairosvg.svg2png(url=str(path), output_width=size * 4)
        with Image.open(io.BytesIO(png)) as img:
            img.load()
            content = crop_to_content(img)
    else:
        svg = path.read_text(errors="replace")
        try:
            img = _resvg(svg, width=size * 4)
        except RenderError:
            img = _resvg(fix_svg_size(svg), width=size * 4)
        if img.height > size * 4:
            img = _resvg(fix_svg_size(svg), height=size * 4)
        content = crop_to_content(img)
    out = to_white_square(content, size, margin=margin)
    if is_blank(out):
        raise RenderError("render is blank")
    return out


@dataclass
class RenderJob:
    """One picture to produce: kind is "svg" (markup), "svg_file" or "raster"; source is markup or a path."""

    kind: str
    source: str
    out: Path
    size: int
    margin: float = 0.0
    fallback_svg: str | None = None  # SVG file rendered when the raster is unusable (empty, tiny)


def _run_job(job: RenderJob) -> tuple[Path, str | None]:
    """Produce one picture; return its path and an error message or None."""
    try:
        if job.kind == "svg":
            img = render_svg(job.source, job.size, margin=job.margin)
        elif job.kind == "svg_file":
            img = render_svg_file(Path(job.source), job.size, margin=job.margin)
        elif job.kind == "raster":
            try:
                img = render_raster(Path(job.source), job.size, margin=job.margin)
            except (RenderError, OSError) as exc:
                if job.fallback_svg is None:
                    raise
                try:
                    img = render_svg_file(Path(job.fallback_svg), job.size, margin=job.margin)
                except Exception as exc2:
                    raise RenderError(f"{exc}; fallback {job.fallback_svg}: {exc2}") from exc2
        else:
            raise ValueError(f"unknown render job kind {job.kind!r}")
        save_png(img, job.out)
    except Exception as exc:  # a bad picture is reported and skipped, never fatal
        return job.out, f"{type(exc).__name__}: {exc}"
    return job.out, None


def run_jobs(jobs: list[RenderJob], workers: int = 2, label: str = "render") -> dict[Path, str]:
    """Run the jobs whose output PNG does not exist yet (a cache); return {output path: error} of failures."""
    todo = [j for j in jobs if not j.out.exists()]
    print(f"[{label}] {len(jobs) - len(todo)} cached, {len(todo)} to render", flush=True)
    if not todo:
        return {}
    if workers > 1 and len(todo) > 50:
        from multiprocessing import get_context

        with get_context("fork").Pool(workers) as pool:
            results = list(pool.imap_unordered(_run_job, todo, chunksize=16))
    else:
        results = [_run_job(j) for j in todo]
    return {out: err for out, err in results if err}
