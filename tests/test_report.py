"""`snakemake --report` on the tiny run (conftest.tiny_run): the HTML holds every figure tiny's outputs
allow, and a real headless browser (Debian's chromium) loads it, shows each figure unbroken and
leaves a screenshot."""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from diffattr import figure_plan
from diffattr.plan import Plan
from diffattr.settings import experiment

from dry_run import REPO

pytestmark = pytest.mark.workflow
CHROMIUM = Path("/usr/bin/chromium")
# headless, offline and without a profile of its own: nothing but the page
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def tiny_figures():
    return figure_plan.figures(Plan("tiny", experiment(yaml.safe_load((REPO / "config.yaml").read_text()), "tiny")))


@pytest.fixture(scope="module")
def report(tiny_run):
    out = tiny_run / "results/report_tiny.html"
    result = subprocess.run([sys.executable, "-m", "snakemake", "--config", "experiment=tiny", "--report", str(out)],
                            cwd=tiny_run, text=True, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_report_holds_every_figure_of_the_preset(tiny_run, report, tiny_figures):
    assert {"headline", "lambda", "gallery_val", "gallery_gen", "losses", "samples"} <= set(tiny_figures)
    html = report.read_text()
    for name in tiny_figures:
        for ext in ("png", "svg"):
            assert (tiny_run / f"results/tiny/figures/{name}.{ext}").stat().st_size > 0
        assert f"filename={name}.png" in html, name
    assert "filename=lds_tiny.csv" in html
    assert "ensembles" not in tiny_figures and "filename=ensembles.png" not in html  # tiny has no retraining


def chromium():
    """Debian's chromium, installed with apt-get when missing (root); skip where neither works."""
    if not CHROMIUM.exists():
        install = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
                                 capture_output=True, text=True)
        if install.returncode != 0:
            install = subprocess.run("apt-get update -q && apt-get install -y -q --no-install-recommends chromium",
                                     shell=True, capture_output=True, text=True)
        if install.returncode != 0 or not CHROMIUM.exists():
            pytest.skip(f"chromium cannot be installed here (apt-get): {install.stderr.strip()[-400:]}")
    return CHROMIUM


def test_report_opens_in_a_browser_with_no_broken_image(tiny_run, report, tiny_figures):
    playwright = pytest.importorskip("playwright.sync_api")
    browser_path = chromium()
    shown, errors = {}, []
    screenshot = tiny_run / "results/report_tiny.png"
    with playwright.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=str(browser_path), headless=True,
                                                       args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        categories = {figure_plan.category(name) for name in tiny_figures}
        for category in sorted(categories):
            page.get_by_role("link", name=category, exact=True).click()
            eyes = page.locator("a[iconname=eye]")
            for i in range(eyes.count()):
                eyes.nth(i).click()
                page.wait_for_function("() => [...document.images].every(img => img.complete)")
                for src, width in page.eval_on_selector_all(
                        "img", "imgs => imgs.map(img => [img.src.slice(0, 200), img.naturalWidth])"):
                    assert width > 0, f"broken image {src[:80]}"
                    if "filename=" in src:
                        shown[src.split("filename=")[1].split(";")[0]] = width
                if shown.get("headline.png") and not screenshot.exists():
                    page.screenshot(path=str(screenshot))
            page.get_by_role("link", name="Results").first.click()
        context.close()
    assert not errors
    assert {f"{name}.png" for name in tiny_figures} <= set(shown)
    assert screenshot.stat().st_size > 0
    kept = REPO / "results/report_tiny.png"  # beside the repository's own results, outliving the test's folder
    kept.parent.mkdir(exist_ok=True)
    shutil.copy(screenshot, kept)
    print(f"screenshot of the report: {screenshot}, kept as {kept}")
