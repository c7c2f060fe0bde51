"""``perceptio demo`` end to end in a real headless browser (Debian's chromium and chromedriver, driven by Selenium):
start the server on a free local port, load the page, pick an example, submit, wait for the answer, check that
the answer, the mask overlay and the depth image appear, and save a screenshot; then two tabs at once, and a file
that is not an image.

``make browser`` installs what it needs. Without a browser the test is skipped, unless
``PERCEPTIO_REQUIRE_BROWSER=1`` (set by CI), where a missing browser fails it. ``PERCEPTIO_SCREENSHOT=PATH`` also
copies the screenshot there (the README's ``docs/images/demo.png`` is made that way).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _need(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        message = f"{program} not found: `make browser` installs chromium, chromedriver, gradio and selenium"
        if os.environ.get("PERCEPTIO_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("PERCEPTIO_REQUIRE_BROWSER") != "1":
        pytest.importorskip("gradio", reason="make browser installs the demo's dependencies")
    _need("chromium")
    port = _free_port()
    temp = tmp_path_factory.mktemp("gradio")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(temp), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    log = (temp / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "perceptio", "demo", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        assert process.poll() is None, (temp / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert time.time() < deadline, "the demo did not start within 180 s"
        time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _need("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1600",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(_need("chromedriver")))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _value(driver, element_id: str) -> str:  # noqa: ANN001 - a selenium WebDriver
    from selenium.webdriver.common.by import By

    fields = driver.find_elements(By.CSS_SELECTOR, f"#{element_id} textarea, #{element_id} input")
    return fields[0].get_attribute("value") if fields else ""


def _wait(condition, timeout: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out waiting for the page"
        time.sleep(0.25)


def _images(driver, element_id: str) -> list:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    return [img for img in driver.find_elements(By.CSS_SELECTOR, f"#{element_id} img") if img.get_attribute("src")]


def _submit_example(driver, url: str, index: int) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#submit"))
    samples = []
    _wait(lambda: samples.extend(driver.find_elements(By.CSS_SELECTOR, ".gallery-item, tr.tr-body")) or samples)
    samples[index].click()
    _wait(lambda: _value(driver, "prompt") != "" and _images(driver, "input-preview"))
    driver.find_element(By.CSS_SELECTOR, "#submit").click()


def test_an_example_is_answered_with_masks_and_depth(server: str, browser, tmp_path: Path) -> None:  # noqa: ANN001
    began = time.perf_counter()
    _submit_example(browser, server, 0)  # a referring expression
    _wait(lambda: _value(browser, "answer") != "")
    seconds = time.perf_counter() - began
    assert _images(browser, "overlay"), "no mask overlay"
    assert _images(browser, "depth"), "no depth image"
    assert "depth span" in _value(browser, "sequence") and "request" in _value(browser, "latency")
    shot = tmp_path / "demo.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("PERCEPTIO_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target)
    print(f"\nend-to-end request in the browser: {seconds:.1f} s; latency shown: {_value(browser, 'latency')}")


def test_two_tabs_at_once_both_get_their_answers(server: str, browser) -> None:  # noqa: ANN001
    first = browser.current_window_handle
    _submit_example(browser, server, 1)
    browser.switch_to.new_window("tab")
    second = browser.current_window_handle
    _submit_example(browser, server, 2)
    for handle in (second, first):
        browser.switch_to.window(handle)
        _wait(lambda: _value(browser, "answer") != "")
    browser.switch_to.window(second)
    browser.close()
    browser.switch_to.window(first)


def test_a_file_that_is_not_an_image_gets_a_message(server: str, browser, tmp_path: Path) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    browser.get(server)
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]"))
    fake = tmp_path / "photo.png"
    fake.write_text("this is not a PNG")
    browser.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(fake))
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("What is the depth map for the image?")
    time.sleep(1.0)
    browser.find_element(By.CSS_SELECTOR, "#submit").click()
    status = []
    _wait(lambda: status.append(browser.find_element(By.CSS_SELECTOR, "#status").text) or status[-1], 60)
    assert "cannot" in status[-1].lower() or "upload" in status[-1].lower(), status[-1]
    with urllib.request.urlopen(server, timeout=5) as response:  # the server keeps serving
        assert response.status == 200
