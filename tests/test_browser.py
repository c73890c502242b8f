"""Real-browser check: the dashboard served by Streamlit, opened in headless Debian Chromium via
Selenium (chromedriver given explicitly, so Selenium Manager never downloads anything).
Skips cleanly when chromium or chromedriver is absent."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from covidtrack.report import synthetic
from covidtrack.store import Store

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
N_SCANS = 4

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromium-driver not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(covidtrack_home: Path) -> Iterator[tuple[str, str]]:
    with Store.open() as store:
        keys = synthetic.populate_store(store, n_patients=2, n_scans=N_SCANS, shape=(16, 48, 48))
    port = _free_port()
    env = {**os.environ, "COVIDTRACK_HOME": str(covidtrack_home), "COVIDTRACK_NO_DEMO": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address", "127.0.0.1",
         "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            time.sleep(0.5)
        yield url, keys[1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def driver() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="covidtrack-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync", "--disable-quic", "--window-size=1400,2000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.parametrize("path", ["", "patients", "cohort"])
def test_every_menu_address_opens_its_page(server: tuple[str, str], driver, path: str) -> None:
    """"/" and "/patients" both open the patient list (the menu's first page has its own address)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    driver.get(f"{url}/{path}")
    title = {"": "Patients", "patients": "Patients", "cohort": "Cohort"}[path]
    WebDriverWait(driver, 60).until(lambda d: any(title in h.text for h in d.find_elements(By.TAG_NAME, "h1")))
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "Page not found" not in body
    assert "Patient timeline" in body and "Models" in body  # the menu is there
    assert "Home" not in [a.text for a in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stSidebar'] a")]


def test_patient_page_shows_trajectory_and_viewer(server: tuple[str, str], driver) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, key = server
    driver.get(f"{url}/patient?patient={key}")
    wait = WebDriverWait(driver, 90)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".st-key-trajectory .main-svg"))
    traj = driver.find_element(By.CSS_SELECTOR, ".st-key-trajectory")
    assert "POI" in traj.text and "Infection volume" in traj.text
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".st-key-viewer .main-svg image")) >= N_SCANS)
    viewer = driver.find_element(By.CSS_SELECTOR, ".st-key-viewer")
    assert "day 0" in viewer.text
    assert viewer.size["height"] > 150 and viewer.size["width"] > 400
    heading = driver.find_element(By.TAG_NAME, "h1").text
    assert key in heading


def test_command_line_writes_while_the_dashboard_is_open(server: tuple[str, str], driver, covidtrack_home: Path) -> None:
    """A page that has loaded holds no lock: a command-line write (removing a scan) succeeds
    while the dashboard is open in a browser, and the page shows the result after a reload."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, key = server
    driver.get(f"{url}/patient?patient={key}")
    wait = WebDriverWait(driver, 90)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".st-key-trajectory .main-svg"))
    env = {**os.environ, "COVIDTRACK_HOME": str(covidtrack_home)}
    with Store.open(read_only=True, wait_s=30) as store:
        scans = store.scans(key)
    last = str(scans.sort_values("study_date")["scan_id"].iloc[-1])
    done = subprocess.run([sys.executable, "-m", "covidtrack", "remove-scan", last, "--yes", "--no-register"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    driver.refresh()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".st-key-trajectory .main-svg"))
    with Store.open(read_only=True, wait_s=30) as store:
        assert len(store.scans(key)) == N_SCANS - 1
    assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text


def test_update_change_runs_in_the_background_of_the_real_server(server: tuple[str, str], driver) -> None:
    """In the served dashboard, 'Update the change vs baseline now' queues a background job whose
    registration runs in a child process; the page reports the result by itself."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, key = server
    driver.get(f"{url}/patient?patient={key}")
    wait = WebDriverWait(driver, 180)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".st-key-register_now button"))
    driver.find_element(By.CSS_SELECTOR, ".st-key-register_now button").click()
    wait.until(lambda d: "Background update of the change vs baseline" in d.find_element(By.TAG_NAME, "body").text)
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "recomputed for" in body or "failed the registration quality check" in body, body[-2000:]
    assert "Traceback" not in body
    with Store.open(read_only=True, wait_s=30) as store:
        assert len(store.registrations(key)) == N_SCANS - 1
