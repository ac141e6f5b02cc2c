"""A real browser (Debian's chromium via Playwright) opens a demo-like report.html and finds every
figure loaded and non-empty: each image decodes, and its pixels hold drawn series, not bare
axes."""

from __future__ import annotations

from pathlib import Path

import pytest
from _live import chromium

from rewardloop.eval.report import build_report

pytestmark = [pytest.mark.browser]

# For each figure: whether the image decoded, its size, what it says it plots, and how many of
# its pixels are in a saturated colour (series and bars; axes, text and grid are grey/black).
MEASURE = """
() => Array.from(document.querySelectorAll('figure')).map(fig => {
  const img = fig.querySelector('img');
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let coloured = 0;
  for (let i = 0; i < px.length; i += 4) {
    const hi = Math.max(px[i], px[i + 1], px[i + 2]), lo = Math.min(px[i], px[i + 1], px[i + 2]);
    if (hi - lo > 80) coloured++;
  }
  return {alt: img.alt, complete: img.complete, width: img.naturalWidth,
          points: Number(fig.dataset.points), coloured};
})
"""


def test_every_figure_of_a_report_is_drawn(tmp_path: Path, report_runs: list[Path]) -> None:
    report = build_report(report_runs, tmp_path / "report.html")
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        found = page.evaluate(MEASURE)
        headline_top = page.evaluate(
            "() => document.querySelector('.headlines').getBoundingClientRect().top")
        first_run_top = page.evaluate(
            "() => document.querySelector('section:not(.headlines)')"
            ".getBoundingClientRect().top")
    assert len(found) >= 10
    for fig in found:
        assert fig["complete"] and fig["width"] > 100, fig
        assert fig["points"] >= 1 and fig["coloured"] > 30, fig
    assert headline_top < first_run_top  # headline figures come first
