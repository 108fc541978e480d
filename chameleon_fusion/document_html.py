"""Interleaved documents (lists of str and PIL images) as one HTML page with the images saved as PNG files."""

from __future__ import annotations

import html
from pathlib import Path

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 48rem; margin: 2rem auto; line-height: 1.5; }}
article {{ border-top: 1px solid #ccc; padding: 1rem 0; }}
p {{ white-space: pre-wrap; }}
img {{ image-rendering: pixelated; width: 16rem; display: block; margin: 0.5rem 0; }}
</style>
</head>
<body>
<h1>{title}</h1>
{documents}
</body>
</html>
"""


def write_document_html(documents, folder, title: str = "Generated documents") -> Path:
    """Write `folder/index.html` showing each document's text and images in order (images as PNGs beside it).

    documents: a list of documents, each a str, a PIL image, or a list of both. Returns the page's path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    articles = []
    for number, document in enumerate(documents):
        parts = document if isinstance(document, (list, tuple)) else [document]
        body = [_part_html(part, folder, f"document{number}_part{index}") for index, part in enumerate(parts)]
        articles.append(f"<article>\n<h2>Document {number + 1}</h2>\n" + "\n".join(body) + "\n</article>")
    page = folder / "index.html"
    page.write_text(PAGE.format(title=html.escape(title), documents="\n".join(articles)), encoding="utf-8")
    return page


def _part_html(part, folder: Path, stem: str) -> str:
    """One piece of a document: escaped text, or an image saved as `<stem>.png` and shown."""
    if isinstance(part, str):
        return f"<p>{html.escape(part)}</p>"
    if hasattr(part, "save") and hasattr(part, "size"):
        part.save(folder / f"{stem}.png")
        return f'<img src="{stem}.png" alt="{stem}">'
    if part is None:
        return "<p><em>(no image)</em></p>"
    raise TypeError(f"a document holds str and PIL images, got {type(part).__name__}")


__all__ = ["write_document_html"]
