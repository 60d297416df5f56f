"""The HTML report rendered by a real browser: headless Chromium (Debian's ``chromium``).

One Chromium run loads a report built here from synthetic data (every optional column, a
Huber disagreement, scenarios, a stock that stopped trading, one that never warmed up), dumps
the DOM after the page settled and takes a screenshot of the first screen (1366 x 900).  A
small probe script is added to a *copy* of the page (the report itself has no scripts): it
decodes every image (by drawing it on a canvas), records script errors and measures where the
overview lands, and writes what it found into the DOM as JSON.  Where no browser is installed
the tests skip and say so.
"""

from __future__ import annotations

import html as html_module
import io
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_report import (
    MANIFEST,
    STOCKS,
    make_scenarios,
    make_sensitivity,
    parse,
    with_inference,
    with_up_down,
)

from sensitivity.report import render_report, summary_table

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1366, 900
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no headless browser: `chromium` is not on PATH (Debian: apt-get install chromium); "
    "the report's browser test is skipped",
)

#: Injected before ``</body>`` of the test copy only.  Writes ``<pre id="probe">{json}</pre>``.
PROBE = """<script>
(() => {
  const errors = [];
  window.addEventListener("error", (e) => errors.push(String(e.message || e.type)), true);
  window.addEventListener("unhandledrejection", (e) => errors.push(String(e.reason)));
  window.addEventListener("load", () => {
    // Drawing an image on a canvas forces a full decode: a broken image throws, a blank one
    // has no spread of grey levels.
    const canvas = document.createElement("canvas");
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    const images = Array.from(document.images).map((img) => {
      const out = {
        chart: img.dataset.chart || "",
        complete: img.complete,
        naturalWidth: img.naturalWidth,
        naturalHeight: img.naturalHeight,
        width: Number(img.getAttribute("width")),
        height: Number(img.getAttribute("height")),
        error: "",
        greySd: 0,
        opaque: 0,
      };
      try {
        canvas.width = Math.max(1, Math.min(img.naturalWidth, 240));
        const scale = canvas.width / Math.max(1, img.naturalWidth);
        canvas.height = Math.max(1, Math.round(scale * img.naturalHeight));
        ctx.clearRect(0, 0, canvas.width, canvas.height);
        ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
        const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0, sum = 0, sq = 0, opaque = 0;
        for (let i = 0; i < px.length; i += 4) {
          const g = (px[i] + px[i + 1] + px[i + 2]) / 3;
          n += 1; sum += g; sq += g * g; opaque += px[i + 3] === 255 ? 1 : 0;
        }
        out.greySd = Math.sqrt(Math.max(0, sq / n - (sum / n) ** 2));
        out.opaque = opaque / n;  // a truncated PNG decodes partly, leaving transparent rows
      } catch (e) {
        out.error = String(e);
      }
      return out;
    });
    const box = (sel) => {
      const el = document.querySelector(sel);
      if (!el) return null;
      const r = el.getBoundingClientRect();
      return { top: r.top, bottom: r.bottom, left: r.left, right: r.right };
    };
    const probe = {
      errors,
      images,
      viewport: { width: window.innerWidth, height: window.innerHeight },
      scrollWidth: document.documentElement.scrollWidth,
      headline: box(".headline"),
      overviewTable: box(".overview table"),
      firstRow: box(".overview tbody tr"),
      sections: Array.from(document.querySelectorAll("section.ticker")).map((s) => s.dataset.ticker || ""),
    };
    const pre = document.createElement("pre");
    pre.id = "probe";
    pre.textContent = JSON.stringify(probe);
    document.body.appendChild(pre);
  });
})();
</script>"""

#: Console lines of Chromium's log that mean the page did not display cleanly.
BAD_LOG = re.compile(r"Uncaught|Failed to decode|Not allowed to load|net::ERR_|Refused to", re.IGNORECASE)


@dataclass(frozen=True)
class Rendered:
    html: str  # the report as written (no probe)
    dom: str  # the DOM Chromium ended with (probe copy)
    probe: dict[str, Any]
    log: str  # Chromium's stderr
    screenshot: bytes


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    assert CHROMIUM is not None
    table = with_inference(make_sensitivity(STOCKS), {"BBB": 6.0})
    summary = with_up_down(summary_table(table), table)
    html = render_report(table, summary, MANIFEST, scenarios=make_scenarios(table)).decode("utf-8")

    folder = tmp_path_factory.mktemp("browser")
    (folder / "report.html").write_text(html, encoding="utf-8")
    assert html.count("</body>") == 1
    probe_page = folder / "probe.html"
    probe_page.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    shot = folder / "first-screen.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={folder / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--window-size={WIDTH},{HEIGHT}",
        "--virtual-time-budget=5000",
        f"--screenshot={shot}",
        "--dump-dom",
        probe_page.as_uri(),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"chromium did not finish within {TIMEOUT_S} s: {exc.stderr!r}")
    assert done.returncode == 0, f"chromium exited with {done.returncode}:\n{done.stderr[-3000:]}"
    match = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.DOTALL)
    assert match, f"the probe never reported (page did not finish loading?):\n{done.stderr[-3000:]}"
    probe = json.loads(html_module.unescape(match.group(1)))
    return Rendered(html, done.stdout, probe, done.stderr, shot.read_bytes())


def test_report_has_no_script_and_no_external_resource(rendered: Rendered) -> None:
    assert "<script" not in rendered.html.lower()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", rendered.html)


def test_report_displays_without_errors_in_chromium(rendered: Rendered) -> None:
    assert rendered.probe["errors"] == []
    bad = [line for line in rendered.log.splitlines() if "CONSOLE" in line or BAD_LOG.search(line)]
    assert [line for line in bad if BAD_LOG.search(line)] == []


def test_every_image_decodes_at_its_declared_size(rendered: Rendered) -> None:
    images = rendered.probe["images"]
    kinds = [img["chart"] for img in images]
    fitted = [s.ticker for s in STOCKS if s.ticker != "NEW"]
    for kind in ("sparkline", "characteristic", "sensitivity", "gamma"):
        assert kinds.count(kind) == len(fitted), kind
    assert kinds.count("heatmap") == 1
    for img in images:
        assert img["complete"], img
        assert img["error"] == "", img
        assert (img["naturalWidth"], img["naturalHeight"]) == (img["width"], img["height"]), img
        assert img["greySd"] > 5.0, img  # decoded to a picture, not a blank
        assert img["opaque"] == 1.0, img  # decoded whole (the charts have no transparency)


def test_dom_holds_the_overview_and_every_ticker(rendered: Rendered) -> None:
    dom = rendered.dom
    checker = parse(dom)
    text = " ".join("".join(checker.text).split())

    assert "Overview: vs ^GSPC" in text
    assert "Most sensitive today:" in text
    assert "Sensitivity across stocks through time" in text
    assert rendered.probe["sections"] == sorted(rendered.probe["sections"], key=_overview_order(dom))
    assert set(rendered.probe["sections"]) == {s.ticker for s in STOCKS}
    for ticker in ("AAA", "BBB", "CCC"):
        assert f'<table class="scenarios" data-ticker="{ticker}">' in dom
    assert "⚠ differs" in text
    assert "BADX" in text  # the failed symbol


def _overview_order(dom: str) -> Any:
    body = dom[dom.index("<tbody>") : dom.index("</tbody>")]
    order = re.findall(r'<a href="#[^"]+">([^<]+)</a>', body)
    return order.index


def test_first_screen_answers_which_stock_is_most_sensitive(rendered: Rendered) -> None:
    probe = rendered.probe
    height, width = probe["viewport"]["height"], probe["viewport"]["width"]

    assert probe["headline"]["bottom"] <= height  # the answer is on the first screen
    assert probe["firstRow"]["bottom"] <= height  # and so is the top of the overview
    assert probe["scrollWidth"] <= width  # no sideways scrolling of the page
    assert probe["overviewTable"]["right"] <= width


def test_screenshot_is_a_real_page(rendered: Rendered) -> None:
    image = Image.open(io.BytesIO(rendered.screenshot))
    assert image.size == (WIDTH, HEIGHT)
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    assert gray.var() > 100.0  # not blank
    assert (gray < 200).mean() > 0.02  # text and tables, not a white page
    colour = np.asarray(image.convert("RGB"), dtype=np.int16)
    spread = colour.max(axis=2) - colour.min(axis=2)
    assert (spread > 40).mean() > 0.005  # the coloured boxes and markers rendered
