"""report/index.html (pipeline/html.py): one self-contained page, checked as HTML and in headless Chromium.

The browser tests launch Chromium twice in all (about a second each): once for a good page shared
by a module-scoped fixture, once for a page with a corrupted image, so the check is seen to fail.
"""

from __future__ import annotations

import base64
import re
import struct
from pathlib import Path

import pytest

from pipeline.html import render_html, write_html
from tests.helpers.browser import images_in_browser

REPORT = """# Report: tiny

Policy `tiny-llama`, **1** round.

## Held-out evaluation

| model | mean score | note |
|---|---:|:---|
| base | 1.94 | first |
| round-0 | 2.41 | second |

![held-out scores](scores.png)

## Training

- round 0: 10 steps
- loss 0.69 → 0.43

![training curves](curves.png)
"""


def _png(path: Path, width_in: float, height_in: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width_in, height_in), dpi=50)
    ax.plot([0, 1, 2], [1, 3, 2])
    fig.savefig(path)
    plt.close(fig)
    return path


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk (bytes 16-24, big-endian)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    _png(folder / "scores.png", 3, 2)  # 150 × 100 px
    _png(folder / "curves.png", 5, 2)  # 250 × 100 px: the widths tell the images apart
    (folder / "report.md").write_text(REPORT, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def page(report_dir) -> Path:
    return write_html(report_dir / "report.md")


@pytest.fixture(scope="module")
def in_browser(page) -> dict:
    return images_in_browser(page)  # the one Chromium launch for the good page


def _data_uris(html: str) -> list[str]:
    return re.findall(r'src="(data:image/png;base64,[^"]*)"', html)


def test_tables_keep_the_markdown_alignment(report_dir):
    html = render_html(REPORT, report_dir, "Report: tiny")
    assert html.count("<table>") == 1 and "<h2>Training</h2>" in html and "<li>round 0: 10 steps</li>" in html
    cells = re.findall(r"<t[hd]([^>]*)>([^<]*)</t[hd]>", html)
    right = [text for attrs, text in cells if 'text-align: right' in attrs]
    left = [text for attrs, text in cells if 'text-align: left' in attrs]
    assert right == ["mean score", "1.94", "2.41"], "the `---:` column, and only it, is right-aligned"
    assert left == ["note", "first", "second"]
    assert "<code>tiny-llama</code>" in html and "<strong>1</strong>" in html


def test_every_image_is_inlined_with_its_exact_bytes(report_dir, page):
    html = page.read_text(encoding="utf-8")
    assert page == report_dir / "index.html"
    assert [src for src in re.findall(r'src="([^"]*)"', html) if not src.startswith("data:")] == []
    uris = _data_uris(html)
    assert len(uris) == 2
    for uri, name in zip(uris, ["scores.png", "curves.png"]):
        assert base64.b64decode(uri.split(",", 1)[1], validate=True) == (report_dir / name).read_bytes()
    assert "<title>Report: tiny</title>" in html, "the title is the report's first `# ` heading"
    assert "http://" not in html and "https://" not in html and "<script" not in html and "<link" not in html
    assert [p.name for p in report_dir.iterdir() if p.name.startswith(".")] == [], "no temp file left behind"


def test_a_missing_image_is_an_error_naming_it(tmp_path):
    (tmp_path / "report.md").write_text("# R\n\n![scores](eval_scores.png)\n")
    with pytest.raises(FileNotFoundError, match="eval_scores.png"):
        write_html(tmp_path / "report.md")
    assert not (tmp_path / "index.html").exists(), "a broken page is not written"


def test_an_image_outside_the_report_folder_is_refused(tmp_path):
    (tmp_path / "report").mkdir()
    _png(tmp_path / "outside.png", 1, 1)
    with pytest.raises(ValueError, match="outside.png"):
        render_html("![x](../outside.png)", tmp_path / "report", "R")


def test_every_image_loads_in_chromium_at_its_pixel_size(report_dir, in_browser):
    assert in_browser["title"] == "Report: tiny" and in_browser["tables"] == 1
    images = in_browser["images"]
    assert [img["loaded"] for img in images] == [True, True], images
    for img, name in zip(images, ["scores.png", "curves.png"]):
        width, height = _png_size((report_dir / name).read_bytes())
        assert (img["naturalWidth"], img["naturalHeight"]) == (width, height)
    assert [img["naturalWidth"] for img in images] == [150, 250]


def test_a_corrupted_image_is_reported_not_loaded(page, tmp_path):
    html = page.read_text(encoding="utf-8")
    good, bad = _data_uris(html)
    broken = tmp_path / "index.html"
    html = html.replace(bad, bad[: len(bad) // 2])  # a truncated PNG
    not_png = base64.b64encode(b"<html>not found</html>").decode()  # what a bad upload would inline
    broken.write_text(html.replace("</body>", f'<img src="data:image/png;base64,{not_png}">\n</body>'), encoding="utf-8")
    images = images_in_browser(broken)["images"]
    assert [img["loaded"] for img in images] == [True, False, False], images
    assert [img["naturalWidth"] for img in images[1:]] == [0, 0]
