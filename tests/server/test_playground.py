"""The playground (`GET /emosteer`): served only with steering on, and driven in a real headless Chromium against
a real `vllm-emosteer serve` of the default model (one server for the module, short answers)."""

import json
import shutil
from types import SimpleNamespace

import pytest
import requests
from fastapi import FastAPI
from fastapi.testclient import TestClient
from server_helpers import Server

from vllm_emosteer.serving.endpoint import EmosteerEndpoint
from vllm_emosteer.serving.playground import ASSETS

EMOTIONS = ["joy", "anger", "disgust", "fear", "sadness"]
CONTROLS = ['id="prompt"', 'id="sliders"', 'id="positions"', 'id="layer-first"', 'id="layer-last"', 'id="seed"',
            'id="temperature"', 'id="max-tokens"', 'id="run"', 'id="answer-plain"', 'id="answer-steered"']
SETUP = "run `make setup` (its `browser` step installs Debian's chromium and chromium-driver; the `test` extra " \
        "installs selenium)"


@pytest.fixture(scope="module")
def server(default_model_dir):
    srv = Server(default_model_dir)
    yield srv
    srv.stop()


def test_page_is_served_only_while_steering_is_on():
    endpoint = EmosteerEndpoint()
    app = FastAPI()
    endpoint.attach_router(app)
    client = TestClient(app)
    refused = client.get("/v1/emosteer")
    assert refused.status_code == 404
    for route in ASSETS:
        reply = client.get(route)
        assert reply.status_code == 404 and reply.json() == refused.json()

    endpoint.options = SimpleNamespace()  # steering on: the page's routes read nothing from the options
    page = client.get("/emosteer")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert all(control in page.text for control in CONTROLS)
    assert client.get("/emosteer/playground.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/emosteer/playground.css").headers["content-type"].startswith("text/css")
    assert client.get("/emosteer/playground.py").status_code == 404


def test_real_server_serves_the_page(server):
    page = requests.get(server.url + "/emosteer", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert all(control in page.text for control in CONTROLS)
    assert requests.get(server.url + "/emosteer/playground.js", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(f"Chromium or its driver is missing (chromium: {chromium}, chromedriver: {driver_path}): {SETUP}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {SETUP}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(argument)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def open_page(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/emosteer")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    for field, value in (("max-tokens", "24"), ("temperature", "0")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)


def slider(browser, emotion):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, f'#sliders input[data-emotion="{emotion}"]')


def run_and_wait(browser, timeout=120):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, timeout).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-running") is None)


def test_browser_streams_unsteered_and_steered_side_by_side(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server)
    sliders = browser.find_elements(By.CSS_SELECTOR, "#sliders input[type=range]")
    assert [s.get_attribute("data-emotion") for s in sliders] == EMOTIONS

    slider(browser, "joy").send_keys(Keys.ARROW_RIGHT * 15)  # step 0.1
    assert slider(browser, "joy").get_attribute("value") == "1.5"
    run_and_wait(browser)

    columns = [browser.find_element(By.ID, name) for name in ("answer-plain", "answer-steered")]
    states = [column.get_attribute("data-state") for column in columns]
    texts = [column.find_element(By.CLASS_NAME, "text").text for column in columns]
    assert states == ["done", "done"], texts
    assert all(texts) and texts[0] != texts[1]
    assert "joy 1.5" in columns[1].find_element(By.TAG_NAME, "h2").text
    sent = [json.loads(column.find_element(By.CLASS_NAME, "request").get_attribute("textContent"))
            for column in columns]
    assert "vllm_xargs" not in sent[0] and sent[0]["messages"] == sent[1]["messages"]
    assert sent[1]["vllm_xargs"] == {"emotions": ["joy"], "intensities": [1.5], "steer_positions": "response"}
    plain, steered = (column.rect for column in columns)
    assert steered["x"] >= plain["x"] + plain["width"] and steered["y"] == plain["y"]  # side by side

    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_browser_shows_server_errors_next_to_the_control(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server)
    slider(browser, "joy").send_keys(Keys.ARROW_RIGHT * 10)
    browser.find_element(By.ID, "layer-last").send_keys("40")
    run_and_wait(browser)
    layers_error = browser.find_element(By.CSS_SELECTOR, '[data-error-for="layers"]')
    assert "steer_layers must be [first, last] with 0 <= first <= last < 30" in layers_error.text
    fieldset = layers_error.find_element(By.XPATH, "ancestor::fieldset")
    assert fieldset.find_element(By.ID, "layer-last").get_attribute("class") == "invalid"
    assert browser.find_element(By.ID, "answer-plain").get_attribute("data-state") == "done"

    browser.find_element(By.ID, "layer-last").clear()
    slider(browser, "joy").send_keys(Keys.END)  # 8.0: within max_intensity, beyond the dose limit
    run_and_wait(browser)
    joy_error = browser.find_element(By.CSS_SELECTOR, '[data-error-for="emotion:joy"]')
    assert "joy at 8.0 reaches a relative dose" in joy_error.text and "max_dose" in joy_error.text
    assert joy_error.find_element(By.XPATH, "..").get_attribute("data-emotion") == "joy"
    assert layers_error.text == ""


def test_browser_third_column_scales_the_mix(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server)
    slider(browser, "joy").send_keys(Keys.ARROW_RIGHT * 10)
    browser.find_element(By.ID, "third").click()
    scale = browser.find_element(By.ID, "third-scale")
    scale.clear()
    scale.send_keys("5")  # joy 5.0: beyond the dose limit, while joy 1.0 is within it
    run_and_wait(browser)
    third = browser.find_element(By.ID, "answer-third")
    assert third.is_displayed() and "joy 5" in third.find_element(By.TAG_NAME, "h2").text
    assert third.get_attribute("data-state") == "error"
    assert "joy at 5.0 reaches a relative dose" in browser.find_element(
        By.CSS_SELECTOR, '[data-error-for="third-scale"]').text
    assert browser.find_element(By.CSS_SELECTOR, '[data-error-for="emotion:joy"]').text == ""
    assert browser.find_element(By.ID, "answer-steered").get_attribute("data-state") == "done"
