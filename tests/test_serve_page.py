"""The page `peftkit serve` shows at `/`, in a real headless browser: Debian's chromium driven by
Selenium with the system's chromedriver (nothing downloaded). Skips where no chromium is
installed; CI installs it (.ci/run). PEFTKIT_SCREENSHOT=DIR keeps the screenshots."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from .test_serve import KEY, TEXTS, adapters, offline, start_server  # noqa: F401 - module fixtures

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium and chromedriver installed")
webdriver = pytest.importorskip("selenium.webdriver")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a browser on the network
    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,1400",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, predicate, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: predicate(d))


def ask(driver, url: str, choices: int, adapter: str, text: str) -> None:
    """Open the page, give it the key, wait for the ``choices`` adapters, pick one, run ``text``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(url + "/")
    key = driver.find_element(By.ID, "key")
    key.send_keys(KEY)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#adapter option")) == choices)
    Select(driver.find_element(By.ID, "adapter")).select_by_value(adapter)
    driver.find_element(By.ID, "text").send_keys(text)
    driver.find_element(By.ID, "run").click()


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PEFTKIT_SCREENSHOT") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def runs_folder(adapters, tmp_path: Path) -> Path:  # noqa: F811
    """Both training runs of the fixture, and a comparison table of them."""
    root = tmp_path / "runs"
    for name, adapter in adapters.items():
        shutil.copytree(adapter.parent, root / name)
    rows = []
    for name in adapters:
        summary = json.loads((root / name / "summary.json").read_text())
        rows.append(
            {
                "run": name,
                "trainable_params": summary["trainable_params"],
                "val_accuracy": summary["validation"]["accuracy"],
            }
        )
    (root / "comparison.json").write_text(json.dumps(rows))
    short = root / "short"  # a run that stopped after its first step: one point per series
    short.mkdir()
    (short / "metrics.jsonl").write_text(
        json.dumps({"type": "train", "step": 25, "loss": 0.61})
        + "\n"
        + json.dumps({"type": "eval", "split": "validation", "step": 25, "loss": 0.52, "accuracy": 0.8, "f1": 0.79})
        + "\n"
    )
    (short / "summary.json").write_text(json.dumps({"best_step": 25, "validation": {"accuracy": 0.8}}))
    return root


def fill(driver, selector: str) -> str:
    """The colour a browser paints an SVG text in (CSS and attributes resolved)."""
    from selenium.webdriver.common.by import By

    return driver.execute_script(
        "return getComputedStyle(arguments[0]).fill", driver.find_element(By.CSS_SELECTOR, selector)
    )


def test_playground_scores_a_text_and_the_runs_show(browser, adapters, offline, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By

    runs = runs_folder(adapters, tmp_path)
    proc, url = start_server({name: runs / name / "adapter" for name in adapters}, "--runs", str(runs))
    try:
        ask(browser, url, 2, "ia3", TEXTS[0])
        bars = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#bars .bar"))
        shown = {b.get_attribute("data-label"): float(b.get_attribute("data-p")) for b in bars}
        want = offline["ia3"][TEXTS[0]]
        assert set(shown) == set(want) and max(abs(shown[k] - want[k]) for k in want) <= 1e-6
        top = browser.find_element(By.CSS_SELECTOR, "#bars .bar.top").get_attribute("data-label")
        assert top == max(want, key=want.get)
        width = browser.find_element(By.CSS_SELECTOR, f'#bars .bar[data-label="{top}"] .fill').size["width"]
        assert width > 0
        link = browser.find_element(By.ID, "run-link")  # the served adapter's own training run
        assert link.text == "trained in run ia3" and link.get_attribute("href").endswith("#run-ia3")
        assert not browser.find_element(By.ID, "lm-options").is_displayed()  # a classifier has no sampling
        rows = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#runs tbody tr"))
        assert sorted(r.find_element(By.TAG_NAME, "td").text for r in rows) == ["ia3", "lora", "short"]
        assert sorted(r.find_elements(By.TAG_NAME, "td")[1].text for r in rows) == ["", "ia3", "lora"]  # the methods
        for name in ("ia3", "lora"):
            loss = browser.find_element(By.CSS_SELECTOR, f'svg.curve.loss[data-run="{name}"]')
            assert loss.find_elements(By.CSS_SELECTOR, "path.train") and loss.find_elements(
                By.CSS_SELECTOR, "path.validation"
            )
            metric = browser.find_element(By.CSS_SELECTOR, f'svg.curve.metric[data-run="{name}"]')
            assert "validation accuracy" in metric.text and metric.find_elements(By.CSS_SELECTOR, "circle")
            steps = json.loads((runs / name / "summary.json").read_text())["steps"]
            labels = [t.text for t in loss.find_elements(By.CSS_SELECTOR, 'text[text-anchor="middle"]')]
            assert labels[-1] == str(steps)  # the last tick is the run's last step
            assert len(loss.find_elements(By.CSS_SELECTOR, 'text[text-anchor="end"].axis')) == 4  # 3 ticks + "step"
        # legends painted in their lines' colours (a CSS rule used to paint them grey)
        assert fill(browser, 'svg.curve.loss[data-run="lora"] .legend-train') == "rgb(47, 111, 222)"
        assert fill(browser, 'svg.curve.loss[data-run="lora"] .legend-validation') == "rgb(217, 130, 43)"
        short = browser.find_element(By.CSS_SELECTOR, 'svg.curve.loss[data-run="short"]')
        assert short.find_elements(By.CSS_SELECTOR, "circle.train-point") and short.find_elements(
            By.CSS_SELECTOR, "circle.validation-point"
        )
        assert [t.text for t in short.find_elements(By.CSS_SELECTOR, 'text[text-anchor="middle"]')] == ["25"]
        table = browser.find_element(By.CSS_SELECTOR, "#comparisons .comparison table")
        assert "val accuracy" in table.text and "ia3" in table.text
        assert browser.find_element(By.ID, "status").text == ""
        screenshot(browser, "serve-classify.png", tmp_path)
        browser.execute_script("document.getElementById('runs-section').scrollIntoView()")
        screenshot(browser, "serve-runs.png", tmp_path)
        # without the key: the page says a key is needed, rather than "pick an adapter"
        browser.get(url + "/")
        status = wait(browser, lambda d: d.find_element(By.ID, "status").text)
        assert status.startswith("API key required") and "needed" in browser.find_element(By.ID, "key").get_attribute(
            "class"
        )
        assert not browser.find_elements(By.CSS_SELECTOR, "#adapter option")
        assert browser.find_element(By.CSS_SELECTOR, 'link[rel="icon"]')  # no favicon.ico request to 404
        screenshot(browser, "serve-key-required.png", tmp_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_playground_streams_a_causal_lm_answer(browser, tiny_llama_dir, tmp_path_factory, tmp_path):
    from selenium.webdriver.common.by import By

    from .test_serve_generate import lm_oracle, make_lm_adapters

    folders = make_lm_adapters(tiny_llama_dir, tmp_path_factory.mktemp("page-lm"))
    answer = lm_oracle(folders)
    proc, url = start_server(folders, "--max-tokens", "64")
    try:
        ask(browser, url, 4, "right", "is it good ?")
        wait(browser, lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1")
        # what `peftkit generate --prompt` answers: the same prompt format, greedy, the page's 64 tokens
        assert browser.find_element(By.ID, "answer").text == answer("right", "is it good ?", 64, chat=True).strip()
        assert browser.find_element(By.ID, "lm-options").is_displayed()
        assert not browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
        screenshot(browser, "serve-chat.png", tmp_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
