"""serve/web/: the web chat, driven end to end in a real headless Chromium (Selenium).

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); skipped with the
reason when they are missing. Screenshots go to tests/artifacts/ (gitignored)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(  # a headless browser against a live server
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason="headless browser test needs Debian's chromium and chromium-driver "
           "(apt-get install -y chromium chromium-driver; .ci/run installs them)")]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from helpers import REPLY, make_tokenizer, running_server, save_chat_model, scripted_model  # noqa: E402
from llm_maker.serve.server import ServeSettings, create_app  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,800"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A server whose model answers REPLY to anything, with a 64-token context; records the
    sampling settings of every job it runs."""
    tok = make_tokenizer()
    engine = save_chat_model(scripted_model(tok, REPLY), tok, tmp_path_factory.mktemp("web") / "model")
    seen = []
    app = create_app(engine, ServeSettings(max_tokens_limit=60))
    real_admit = app.state.worker.batch.admit
    app.state.worker.batch.admit = lambda job: (seen.append(job.params), real_admit(job))
    with running_server(app) as url:
        yield url, seen


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def open_chat(driver, url: str) -> None:
    driver.get(url + "/")
    WebDriverWait(driver, 20).until(lambda d: "test-sft" in d.find_element(By.ID, "model-info").text)


def send(driver, text: str) -> "webdriver.remote.webelement.WebElement":
    """Type `text` and press Enter; return the new assistant bubble once its reply is complete."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    WebDriverWait(driver, 30).until(
        lambda d: len(replies := d.find_elements(By.CSS_SELECTOR, ".message.assistant")) > before
        and replies[-1].get_attribute("data-state") == "done")
    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]


def set_control(driver, element_id: str, value) -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input'));", element_id, str(value))


def test_a_typed_message_gets_a_streamed_reply(browser, chat):
    url, _ = chat
    open_chat(browser, url)
    assert "64-token context" in browser.find_element(By.ID, "model-info").text
    reply = send(browser, "What is a class?")
    assert reply.find_element(By.CSS_SELECTOR, ".text").text == REPLY.strip()
    assert int(reply.get_attribute("data-chunks")) == 9  # token by token, not in one piece
    assert reply.get_attribute("data-finish") == "stop"
    users = browser.find_elements(By.CSS_SELECTOR, ".message.user")
    assert [u.find_element(By.CSS_SELECTOR, ".text").text for u in users] == ["What is a class?"]
    assert screenshot(browser, "web_chat_reply").stat().st_size > 10_000


def test_sampling_controls_reach_the_server(browser, chat):
    url, seen = chat
    open_chat(browser, url)
    for element_id, value in (("temperature", 0), ("top-k", 5), ("top-p", 0.5), ("repetition-penalty", 1.3),
                              ("max-tokens", 3)):
        set_control(browser, element_id, value)
    reply = send(browser, "Short please")
    params = seen[-1]
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty, params.max_tokens) == \
        (0.0, 5, 0.5, 1.3, 3)
    assert reply.find_element(By.CSS_SELECTOR, ".text").text == "The class"  # 3 tokens: " T", "he", " class"
    assert reply.get_attribute("data-finish") == "length"
    assert "cut at max new tokens" in reply.text


def test_multi_turn_history_drops_old_turns_visibly_and_clears(browser, chat):
    url, seen = chat
    open_chat(browser, url)
    set_control(browser, "max-tokens", 12)  # a 52-token budget for the conversation
    note = browser.find_element(By.ID, "context-note")
    turns = 0
    while not note.is_displayed():
        send(browser, f"And item {turns}?")
        turns += 1
        assert turns <= 6, "the 64-token context never overflowed"
    assert turns >= 2  # the first turns fitted: history was really sent
    assert "Dropped the 2 oldest messages to fit the model's 64-token context" in note.text
    dropped = browser.find_elements(By.CSS_SELECTOR, ".message.dropped")
    assert [d.get_attribute("class") for d in dropped] == ["message user dropped", "message assistant dropped"]
    assert dropped[0].find_element(By.CSS_SELECTOR, ".text").text == "And item 0?"
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message")) == 2 * turns
    screenshot(browser, "web_chat_dropped_turns")
    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == [] and not note.is_displayed()
    send(browser, "Fresh start")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message")) == 2
