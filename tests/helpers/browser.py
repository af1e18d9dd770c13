"""Open a page in headless Chromium and say what it shows: did each image decode, how many tables.

No Python browser driver: a copy of the page gets a small script that, once everything has
loaded, writes a JSON summary into `<pre id="probe">`; Chromium's `--dump-dom` prints the DOM
after that and the summary is read back from it. Needs Debian's `chromium` (scripts/setup_browser.sh).

Flags for Chromium 150: `--headless` is the new headless mode (the old one now ships apart, as
chrome-headless-shell); `--no-sandbox` because tests may run as root, where the sandbox refuses to
start; `--virtual-time-budget` lets the page load and `onload` run before the DOM is dumped; a
throw-away `--user-data-dir` so parallel runs do not fight over ~/.config/chromium's lock.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"

_PROBE = """<script>
window.onload = function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {src: img.getAttribute("src").slice(0, 40), complete: img.complete,
            naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight};
  });
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({title: document.title, tables: document.querySelectorAll("table").length,
                                    images: images});
  document.body.appendChild(pre);
};
</script>
"""


def images_in_browser(html_path: Path, timeout: float = 60) -> dict:
    """`{"title", "tables", "images": [{"src" (first 40 chars), "complete", "naturalWidth",
    "naturalHeight", "loaded"}]}` for the page as Chromium renders it; `loaded` is what a reader
    sees: the image decoded (`complete and naturalWidth > 0`), not a broken icon."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run scripts/setup_browser.sh (installs Debian's `chromium`)")
    page = Path(html_path).read_text(encoding="utf-8")
    if "</body>" not in page:
        raise ValueError(f"{html_path} has no </body> to put the probe before")
    with tempfile.TemporaryDirectory(prefix="browser-probe-") as tmp:
        probed = Path(tmp) / "page.html"
        probed.write_text(page.replace("</body>", _PROBE + "</body>", 1), encoding="utf-8")
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp}/profile",
               "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    if proc.returncode != 0 or found is None:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise RuntimeError(f"chromium did not report on {html_path} (exit {proc.returncode}); its stderr ends:\n{tail}")
    summary = json.loads(html.unescape(found.group(1)))  # --dump-dom escapes &, <, > in text
    for img in summary["images"]:
        img["loaded"] = bool(img["complete"] and img["naturalWidth"] > 0)
    return summary
