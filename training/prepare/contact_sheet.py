"""Contact sheets: a labelled grid of a few images per class, to check renders by eye."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def contact_sheet(rows: dict[str, list[Path]], out: Path, cell: int = 96, label_width: int = 200,
                  max_cols: int = 8) -> Path:
    """Draw one row per label with up to `max_cols` images, on a grey grid so white margins stay visible."""
    n_rows = max(1, len(rows))
    width = label_width + max_cols * (cell + 4) + 4
    height = n_rows * (cell + 4) + 4
    sheet = Image.new("RGB", (width, height), (150, 150, 150))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, (label, paths) in enumerate(rows.items()):
        y = 4 + r * (cell + 4)
        draw.text((6, y + cell // 2 - 6), label[:32], fill=(0, 0, 0), font=font)
        for c, path in enumerate(paths[:max_cols]):
            x = label_width + 4 + c * (cell + 4)
            try:
                with Image.open(path) as img:
                    tile = img.convert("RGB").resize((cell, cell))
            except OSError as exc:
                print(f"[sheet] {path}: cannot open ({exc})")
                tile = Image.new("RGB", (cell, cell), (255, 0, 0))
            sheet.paste(tile, (x, y))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
