"""report/index.html: report.md as one self-contained page.

One file a user can mail, attach to a ticket or open straight from an object store (a browser
shown `s3://.../report/index.html` through a presigned link has no folder to fetch `plot.png`
from): every image is inlined as a `data:` URI, the CSS is inline, and nothing else is fetched
(no scripts, fonts or external stylesheets). An image the markdown names but the folder lacks is
an error, not a broken icon: a report must not be written silently incomplete.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import os
from pathlib import Path
from xml.etree.ElementTree import Element

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.5; color: #222; }
h1, h2, h3 { line-height: 1.25; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: .3em .6em; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #f8f8f8; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
img { max-width: 100%; height: auto; }
"""


class _InlineImages(Treeprocessor):
    """Replaces each `<img src="plot.png">` by the file's bytes as a data URI; runs after the
    inline patterns (which make the `<img>` elements from `![alt](src)`)."""

    def __init__(self, md: markdown.Markdown, folder: Path):
        super().__init__(md)
        self.folder = folder

    def run(self, root: Element) -> None:
        for img in root.iter("img"):
            src = img.get("src", "")
            if not src.startswith("data:"):
                img.set("src", data_uri(self.folder, src))


def data_uri(folder: Path, src: str) -> str:
    """`data:<mime>;base64,...` for the image file `src`, a path relative to `folder` (the one
    report.md is in)."""
    folder = Path(folder).resolve()
    path = (folder / src).resolve()
    if "://" in src or not path.is_relative_to(folder):  # a URL, an absolute path or `../x.png`
        raise ValueError(f"report image {src!r} is not a file in {folder}: the page inlines only the report's own images")
    if not path.is_file():
        raise FileNotFoundError(f"report image {src!r} not found: {path} is missing (re-run `python -m pipeline report`)")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


class _InlineImagesExtension(Extension):
    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def extendMarkdown(self, md: markdown.Markdown) -> None:  # noqa: N802  (markdown's name)
        md.treeprocessors.register(_InlineImages(md, self.folder), "inline_images", 5)  # inline patterns run at 20


def render_html(markdown_text: str, folder: Path, title: str) -> str:
    """The whole page: GitHub-style markdown (pipe tables with their alignment, lists) as HTML,
    with the images of `folder` inlined."""
    body = markdown.markdown(markdown_text, extensions=["tables", "sane_lists", _InlineImagesExtension(folder)])
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")  # fmt: skip


def write_html(report_md: Path) -> Path:
    """index.html beside report.md (whole or not at all); its title is the report's first `# ` heading."""
    report_md = Path(report_md)
    text = report_md.read_text(encoding="utf-8")
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), report_md.parent.name)
    page = render_html(text, report_md.parent, title)
    out = report_md.with_name("index.html")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
