"""lab/tensorboard_screenshots.py on a tiny runs folder: both dashboards come back as PNGs of the window's size.
Needs Chromium: skipped, naming the package, where it is missing."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from lab.report import write_layout
from lab.tensorboard_screenshots import BROWSERS, ScreenshotError, find_browser, take_screenshots


def test_screenshots_of_the_custom_scalars_and_hparams_dashboards(tmp_path):
    try:
        find_browser()
    except ScreenshotError:
        pytest.skip(f"chromium is not installed (apt-get install chromium): none of {', '.join(BROWSERS)} on PATH")
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    runs = tmp_path / "runs" / "tiny"
    for family, slope in (("NTP", 1.0), ("MTP", 0.5)):  # two runs, as compare.py lays them out, with their hparams
        writer = SummaryWriter(str(runs / family.lower() / "seed0"))
        for step in (10, 20, 30):
            writer.add_scalar("val/bpb", 3.0 - slope * step / 30, step)
        for summary in hparams({"family": family, "seed": 0}, {"val/bpb": 0.0}):
            writer.file_writer.add_summary(summary)
        writer.close()
    write_layout(runs / "report", SimpleNamespace(name="tiny"))
    paths = take_screenshots(runs, tmp_path / "docs" / "tiny", size=(1600, 1200))
    assert [p.name for p in paths] == ["tensorboard_custom_scalars.png", "tensorboard_hparams.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (1600, 1200), (path, image.size)
            low, high = image.convert("L").getextrema()
            assert high - low > 50, f"{path} is blank"  # a rendered page, not one colour
