"""MLflow's UI in a real browser: ``sophon-ray ui`` on a small real store, its experiment link opened in headless
Chromium, the runs table checked and screenshotted. Skipped when no Chromium binary is installed
(``apt-get install chromium``; .ci/run installs it where apt-get exists). About 30-60 s."""

import os

import matplotlib.image
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

from sophon_ray import names  # noqa: E402
from tests.browser import Chromium, find_chromium, show_runs  # noqa: E402
from tests.store import small_sweep  # noqa: E402
from tests.ui_process import UiProcess  # noqa: E402

CHROMIUM = find_chromium()
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (chromium, chromium-browser, "
                                 "google-chrome): apt-get install chromium")]
WIDTH, HEIGHT = 1400, 900


def test_the_printed_experiment_link_opens_the_sweep_runs_not_the_genai_view(tmp_path):
    store = small_sweep(tmp_path / "store")
    ui = UiProcess(tmp_path, str(store["spec"]), "--port", "0")
    try:
        url = ui.start()
        with Chromium(CHROMIUM, WIDTH, HEIGHT) as browser:
            text = show_runs(browser, url, store["experiment_id"], columns=(names.FINAL, names.SUBJECT))
            png = browser.screenshot(tmp_path / "mlflow-experiment.png")
    finally:
        ui.stop()
    # the runs table with the parent run expanded into its children, in MLflow's "Model training" view
    assert "sweep-0123456789ab" in text and "pretrain" in text and "protect/ice-sampled/s0" in text, text
    assert "15 matching runs" in text and names.FINAL in text and "Traces\n0" not in text, text
    image = matplotlib.image.imread(png)
    assert png.stat().st_size > 20_000 and image.shape[:2] == (HEIGHT, WIDTH), image.shape
    assert image[..., :3].std() > 0.05, "the screenshot looks blank"
    assert ui.process.returncode == 0
