"""Take the README's screenshots of `diffsynth ui` (one per tab) with Playwright and Debian's Chromium.

    diffsynth ui --port 7860 --output /tmp/ui-shots &     # flux-nano
    python docs/ui/screenshots.py http://127.0.0.1:7860/ docs/ui [TRAINING_STEPS]
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright


def main(url: str, folder: Path, steps: int = 150) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        page.get_by_role("button", name="Draw the purple example").click()
        expect(page.get_by_label("Image folder")).to_have_value(re.compile("purple-example"), timeout=30_000)
        page.get_by_label("Run name").fill("purple")
        page.get_by_label("Training steps").fill(str(steps))
        page.get_by_role("button", name="Train", exact=True).click()
        expect(page.get_by_label("Training status")).to_have_value("purple: done", timeout=3_600_000)
        page.screenshot(path=str(folder / "train.png"))
        page.get_by_role("tab", name="Generate").click()
        for prompt, seed, lora in (("a red circle on the left", 1, None), ("a purple square on the top", 2,
                                                                            f"train/purple/step-{steps}.safetensors")):
            if lora:
                page.get_by_label("LoRA 1", exact=True).click()
                page.get_by_role("option", name=lora).click()
            page.get_by_label("Prompt", exact=True).fill(prompt)
            page.get_by_label("Seed", exact=True).fill(str(seed))
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_label("Used seed")).to_have_value(str(seed), timeout=600_000)
        page.screenshot(path=str(folder / "generate.png"))
        page.get_by_role("tab", name="Edit / condition").click()
        page.screenshot(path=str(folder / "edit.png"))
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:4]))
