"""The README's scatter of `pretrain.mask_ratio` against `finetune/test_top1`, clicked
through in the real MLflow UI by headless Chromium, with a screenshot of each step.

Playwright drives Debian's `chromium`; it is not a dependency of the project:

    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    mae-cli ui --port 5077 &      # prints the chart view's address
    /tmp/pw/bin/python scripts/ui_scatter.py '<the chart view's address>' OUT
"""

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

url, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(url)
    page.wait_for_timeout(8000)
    # 1. The charts show the first 10 runs: the eye above the run names shows them all.
    page.get_by_role("button", name="Toggle visibility of runs").click()
    page.get_by_role("menuitemradio", name="Show all runs").click()
    page.wait_for_timeout(1500)
    page.screenshot(path=out / "scatter-1-all-runs.png")
    # 2. Add chart (of any section) -> Scatter chart; X axis and Y axis take typed names.
    page.get_by_role("button", name="Add chart", exact=True).first.click()
    page.get_by_role("menuitem", name="Scatter chart").click()
    page.wait_for_timeout(1500)
    dialog = page.get_by_role("dialog")
    for box, name in zip(
        dialog.get_by_role("combobox").all()[-2:],
        ["pretrain.mask_ratio", "finetune/test_top1"],
        strict=True,
    ):
        box.click(force=True)  # the shown value covers the input
        page.keyboard.type(name)
        page.wait_for_timeout(800)
        page.keyboard.press("Enter")
        page.wait_for_timeout(800)
    page.screenshot(path=out / "scatter-2-dialog.png")
    dialog.get_by_role("button", name="Add chart").click()
    page.wait_for_timeout(3000)
    page.screenshot(path=out / "scatter-3-added.png")
    browser.close()
print(f"screenshots in {out}")
