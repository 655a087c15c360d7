"""The scatter of a swept param (`pretrain.mask_ratio` by default, or
`pretrain.mask_type`, ...) against `finetune/test_top1` that docs/sweeps.md describes,
clicked through in the real MLflow UI by headless Chromium, a screenshot of each step.

Playwright drives Debian's `chromium`; it is not a dependency of the project:

    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    mae-cli ui --port 5077 &      # prints the chart view's address
    /tmp/pw/bin/python scripts/ui_scatter.py '<the chart view's address>' OUT [X [Y]]
"""

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

url, out = sys.argv[1], Path(sys.argv[2])
x_axis = sys.argv[3] if len(sys.argv) > 3 else "pretrain.mask_ratio"
y_axis = sys.argv[4] if len(sys.argv) > 4 else "finetune/test_top1"
prefix = "scatter" if x_axis == "pretrain.mask_ratio" else f"scatter-{x_axis.split('.')[-1]}"
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
    page.screenshot(path=out / f"{prefix}-1-all-runs.png")
    # 2. Add chart (of any section) -> Scatter chart; X axis and Y axis take typed names.
    page.get_by_role("button", name="Add chart", exact=True).first.click()
    page.get_by_role("menuitem", name="Scatter chart").click()
    page.wait_for_timeout(1500)
    dialog = page.get_by_role("dialog")
    for box, name in zip(
        dialog.get_by_role("combobox").all()[-2:],
        [x_axis, y_axis],
        strict=True,
    ):
        box.click(force=True)  # the shown value covers the input
        page.keyboard.type(name)
        page.wait_for_timeout(800)
        page.keyboard.press("Enter")
        page.wait_for_timeout(800)
    page.screenshot(path=out / f"{prefix}-2-dialog.png")
    dialog.get_by_role("button", name="Add chart").click()
    page.wait_for_timeout(3000)
    page.screenshot(path=out / f"{prefix}-3-added.png")
    browser.close()
print(f"screenshots in {out}")
