"""Dashboard and report speed, plus screenshots of every page (bench/figures/ui_*.png).

Measures, on this machine:

- patient page with 6 timepoints: server-side script time (Streamlit AppTest) cold and with warm
  caches, and in headless Chromium the time from navigation until every chart is drawn (warm);
- cohort page with 1,000 patients (synthetic metric rows, ~4,500 scans in DuckDB): the same;
- trend report PDF: patient (6 timepoints, aligned images) and cohort (1,000 patients);
- optionally (``--first-start``) the first start: the demo cohort built through the real
  pipeline into an empty store (needs the shipped models).

Data: by default synthetic stores (``covidtrack.report.synthetic``: geometric phantom masks and
metrics computed from them, no segmentation model), because page speed does not depend on where
the numbers came from. ``--demo-home DIR`` uses an existing store instead (e.g. the demo cohort).

    nice -n 5 python bench/ui_bench.py [--first-start] [--demo-home DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "ui_bench.json"
FIGURES = REPO / "bench" / "figures"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bulk_cohort(store: object, n_patients: int, seed: int = 0) -> int:
    """Insert a synthetic cohort's metric rows (one shared tiny volume/mask file set: the cohort
    page reads only metrics). Returns the number of scans."""
    import numpy as np

    from covidtrack.report import synthetic
    from covidtrack.store import FileStage, ScanRecord, SegRecord, new_scan_id, new_seg_id, write_canonical
    from covidtrack.volume import Volume

    frame = synthetic.cohort_frame(n_patients, seed=seed)
    vol = Volume(array=np.full((4, 8, 8), -1000, np.int16), spacing=(1.0, 1.0, 1.0))
    with FileStage() as stage:
        vpath = stage.put(store.volume_path_for("bench-shared"), lambda p: write_canonical(p, vol))  # type: ignore[attr-defined]
        mpath = stage.put(store.mask_path_for("bench-shared", "lungs"), lambda p: write_canonical(p, vol, np.zeros((4, 8, 8), np.uint8)))  # type: ignore[attr-defined]
    versions = {"lungs": "lungs/v1", "infection": "infection/v1", "lobes": "lobes/v1"}
    n = 0
    for (key, scan), rows in frame.groupby(["patient_key", "scan_id"], sort=False):
        sid = new_scan_id(f"bench-{scan}")
        store.add_scan(  # type: ignore[attr-defined]
            ScanRecord(scan_id=sid, patient_key=key, study_date=rows["study_date"].iloc[0].date(), content_hash=f"bench-{scan}", volume_path=vpath),
            SegRecord(seg_id=new_seg_id(), scan_id=sid, kind="model", model_versions=versions, lungs_path=mpath, infection_path=mpath, lobes_path=mpath),
            rows[["region", "metric", "value", "unit"]],
            arm=rows["arm"].iloc[0],
        )
        n += 1
    return n


def apptest_times(page: str, query: dict[str, str], repeats: int = 3) -> dict[str, float]:
    """Server-side script time (s): the landing Patients page on cold caches (it loads the cohort
    table), the first visit of ``page`` after it, and the median warm rerun of ``page``."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300)
    for k, v in query.items():
        at.query_params[k] = v
    t0 = time.perf_counter()
    at.run()
    landing = time.perf_counter() - t0
    t0 = time.perf_counter()
    at.switch_page(f"covidtrack/ui/pages/{page}.py")
    at.run()
    cold = time.perf_counter() - t0
    if at.exception:
        raise RuntimeError(f"{page}: {[e.value for e in at.exception]}")
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        at.run()
        warm.append(time.perf_counter() - t0)
    warm.sort()
    from covidtrack.ui import resources

    resources.store().close()  # DuckDB allows one writer per file: free it for the server below
    st.cache_resource.clear()
    return {"landing_s": round(landing, 3), "first_visit_s": round(cold, 3), "warm_median_s": round(warm[len(warm) // 2], 3)}


class Server:
    """``streamlit run app.py`` on a free port for one store (terminated on exit)."""

    def __init__(self, home: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        env = {**os.environ, "COVIDTRACK_HOME": str(home), "COVIDTRACK_NO_DEMO": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(self.port), "--server.headless", "true"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("streamlit did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def browser() -> object:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="covidtrack-bench-chromium-")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--window-size=1400,1800", f"--user-data-dir={profile}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver._covidtrack_profile = profile  # type: ignore[attr-defined]
    return driver


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(v) for v in fields[11:15]) / ticks  # utime, stime, cutime, cstime


def _browser_task_s(driver: object) -> float:
    """Renderer main-thread busy time so far (Chrome DevTools Performance.TaskDuration, s)."""
    metrics = driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]  # type: ignore[attr-defined]
    return float(next((m["value"] for m in metrics if m["name"] == "TaskDuration"), float("nan")))


def timed_load(driver: object, server: "Server", url: str, last_text: str) -> dict[str, float]:
    """Wall time of a page load plus the CPU it cost: the Streamlit server process and the
    browser's renderer main thread. Under heavy machine load wall time inflates; CPU time much less."""
    cpu0, task0 = _proc_cpu_s(server.proc.pid), _browser_task_s(driver)
    wall = load_and_time(driver, url, last_text)
    cpu1, task1 = _proc_cpu_s(server.proc.pid), _browser_task_s(driver)
    task = task1 - task0 if task1 >= task0 else task1  # the counter restarts with a new renderer
    return {"wall_s": round(wall, 2), "server_cpu_s": round(cpu1 - cpu0, 2), "browser_main_thread_s": round(task, 2)}


# page label -> (sidebar link href ending, page heading)
NAV_TITLES = {"patient": ("/patient", "Patient "), "patients": ("/patients", "Patients"), "cohort": ("/cohort", "Cohort"),
              "import": ("/import", "Import"), "report": ("/report", "Trend reports")}


def spa_navigate(driver: object, server: "Server", label: str, last_text: str) -> dict[str, float]:
    """Warm visit the way a user makes it: click the page in the sidebar (no reload of the app's
    JavaScript), from another page, with the server's caches warm. Wall and CPU as timed_load."""
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    away = "import" if label != "import" else "report"

    def menu_link(path: str) -> object:
        """The sidebar menu's link to ``path`` (its href, without any query, ends with it)."""
        for a in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebar"] a'):  # type: ignore[attr-defined]
            href = (a.get_attribute("href") or "").split("?")[0]
            if href.endswith(path):
                return a
        raise RuntimeError(f"no menu link to {path}")

    menu_link(NAV_TITLES[away][0]).click()  # type: ignore[attr-defined]
    wait = WebDriverWait(driver, 180, poll_frequency=0.05, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))  # pages re-render
    wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text.startswith(NAV_TITLES[away][1]))
    time.sleep(1.0)
    nav, heading = NAV_TITLES[label]
    cpu0, task0 = _proc_cpu_s(server.proc.pid), _browser_task_s(driver)
    t0 = time.perf_counter()
    menu_link(nav).click()  # type: ignore[attr-defined]
    wait.until(lambda d: d.find_element(By.TAG_NAME, "h1").text.startswith(heading))
    wait.until(lambda d: last_text in d.find_element(By.TAG_NAME, "body").text)
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stSkeleton"]'))
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-stale="true"]'))

    def drawn(d: object) -> bool:
        charts = [c for c in d.find_elements(By.CSS_SELECTOR, '[data-testid="stPlotlyChart"]') if c.is_displayed()]  # type: ignore[attr-defined]
        return all(c.find_elements(By.CSS_SELECTOR, ".main-svg") for c in charts)

    wait.until(drawn)
    wall = time.perf_counter() - t0
    cpu1, task1 = _proc_cpu_s(server.proc.pid), _browser_task_s(driver)
    return {"wall_s": round(wall, 2), "server_cpu_s": round(cpu1 - cpu0, 2), "browser_main_thread_s": round(task1 - task0, 2)}


def load_and_time(driver: object, url: str, last_text: str = "not a diagnosis") -> float:
    """Seconds from navigation until the page's last element (``last_text``, e.g. the disclaimer
    every page ends with) is shown, no element is a loading skeleton, and every visible chart is
    drawn. A fresh navigation builds a new DOM, so no stale element from an earlier run counts."""
    from selenium.webdriver.common.by import By
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.perf_counter()
    driver.get(url)  # type: ignore[attr-defined]
    wait = WebDriverWait(driver, 180, poll_frequency=0.05, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))  # pages re-render
    wait.until(lambda d: d.find_elements(By.TAG_NAME, "h1") or d.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'))
    errors = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')  # type: ignore[attr-defined]
    if errors:
        raise RuntimeError(f"{url}: {errors[0].text[:500]}")
    wait.until(lambda d: last_text in d.find_element(By.TAG_NAME, "body").text)
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stSkeleton"]'))

    def drawn(d: object) -> bool:
        charts = [c for c in d.find_elements(By.CSS_SELECTOR, '[data-testid="stPlotlyChart"]') if c.is_displayed()]  # type: ignore[attr-defined]
        return all(c.find_elements(By.CSS_SELECTOR, ".main-svg") for c in charts)

    wait.until(drawn)
    return time.perf_counter() - t0


def screenshot(driver: object, name: str, height: int | None = None) -> None:
    from PIL import Image

    FIGURES.mkdir(parents=True, exist_ok=True)
    if height:
        driver.set_window_size(1400, height)  # type: ignore[attr-defined]
        time.sleep(1.0)
    tmp = FIGURES / f".{name}.png"
    driver.save_screenshot(str(tmp))  # type: ignore[attr-defined]
    img = Image.open(tmp).convert("RGB")
    img.thumbnail((1100, 2400))
    img.save(FIGURES / f"{name}.png", optimize=True)
    tmp.unlink()


def screens_from(home: Path, last: dict[str, str]) -> None:
    """Screenshots of the patient-side pages from another store (e.g. phantoms through the pipeline)."""
    from covidtrack.store import Store

    os.environ["COVIDTRACK_HOME"] = str(home)
    with Store.open() as store:
        counts = store.scans().groupby("patient_key").size().sort_values(ascending=False)
    key = str(counts.index[0])
    server = Server(home)
    driver = browser()
    try:
        for page in (f"patient?patient={key}", "", "import", "report"):
            label = page.split("?")[0] or "patients"
            load_and_time(driver, f"{server.url}/{page}", last.get(label, "not a diagnosis"))
            screenshot(driver, f"ui_{label}", height=2000 if label == "patient" else 1100)
            driver.set_window_size(1400, 1800)  # type: ignore[attr-defined]
    finally:
        driver.quit()  # type: ignore[attr-defined]
        shutil.rmtree(driver._covidtrack_profile, ignore_errors=True)  # type: ignore[attr-defined]
        server.close()


def measure_first_start(home: Path, on_ready: Any = None) -> dict[str, object]:
    """Wall time of the demo bootstrap into the empty store at ``home`` (the real pipeline, shipped
    models). The store is kept for the page timings and screenshots."""
    from covidtrack import bootstrap
    from covidtrack.store import Store

    os.environ["COVIDTRACK_HOME"] = str(home)
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    last_stage, last_t = "start", t0
    with Store.open() as store:
        # as the dashboard does it: scans measured -> dashboard opens; registration afterwards
        events = bootstrap.bootstrap(store, register=False)
        while True:
            try:
                ev = next(events)
            except StopIteration as stop:
                result = stop.value
                break
            now = time.perf_counter()
            stages[last_stage] = stages.get(last_stage, 0.0) + now - last_t
            last_stage, last_t = ev.stage, now
        ready = time.perf_counter() - t0
        load_ready = [round(v, 1) for v in os.getloadavg()]
        if on_ready is not None:  # record the headline number before the long background phase
            on_ready({"seconds_until_dashboard_opens": round(ready, 1), "scans_stored": result.stored,
                      "failed": [list(f) for f in result.failed], "seconds_by_stage": {k: round(v, 1) for k, v in stages.items()},
                      "load_average_when_ready": load_ready, "seconds_background_alignment": "not finished when recorded"})
        t1 = time.perf_counter()
        from covidtrack.pipeline import drain

        warnings = drain(bootstrap.register_all(store))
        align = time.perf_counter() - t1
        counts = store.counts()
    return {"seconds_until_dashboard_opens": round(ready, 1), "seconds_background_alignment": round(align, 1),
            "scans_stored": result.stored, "failed": [list(f) for f in result.failed], "alignment_warnings": warnings,
            "seconds_by_stage": {k: round(v, 1) for k, v in stages.items()}, "store_counts": counts,
            "load_average_when_ready": load_ready, "load_average_at_end": [round(v, 1) for v in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first-start", action="store_true", help="also time the demo bootstrap (needs shipped models)")
    ap.add_argument("--demo-home", type=Path, help="an existing COVIDTRACK_HOME to screenshot and time (e.g. the demo cohort)")
    ap.add_argument("--cohort-patients", type=int, default=1000)
    ap.add_argument("--cohort-home", type=Path, help="keep / reuse the 1,000-patient store here (inserting takes minutes)")
    ap.add_argument("--screens-home", type=Path, help="take the patient-side screenshots from this COVIDTRACK_HOME (no timing)")
    ap.add_argument("--only-first-start", action="store_true", help="measure only the first start and merge it into the JSON")
    args = ap.parse_args()
    if args.only_first_start:
        home = Path(tempfile.mkdtemp(prefix="covidtrack-uibench-first-"))

        def save(first: dict[str, object]) -> None:
            record = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
            record["first_start"] = {**first, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                     "code_commit": _git_commit(), "cpu_count": os.cpu_count()}
            RESULTS.write_text(json.dumps(record, indent=1, default=str) + "\n")
            print("first start", first, flush=True)

        try:
            save(measure_first_start(home, on_ready=save))
        finally:
            shutil.rmtree(home, ignore_errors=True)
        return

    from covidtrack.report import load, pdf, synthetic
    from covidtrack.store import Store

    out: dict[str, object] = {
        "what": "dashboard page times (server script via Streamlit AppTest; browser: navigation until the page's last element "
                "is shown and every chart is drawn, headless Debian chromium; first load (cold caches), reload (warm caches, the browser "
                "reloads the app's JavaScript) and in-app visit (warm, clicked in the sidebar: what a user does), each with the CPU "
                "seconds it cost in the Streamlit server and the browser renderer's main-thread busy time) and trend-report PDF times",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_commit": _git_commit(),
        "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "note": "2 CPU cores shared with other jobs; times include that contention (see load_average)",
                     "python": platform.python_version(), "load_average_at_start": [round(v, 1) for v in os.getloadavg()]},
        "goals_s": {"patient_page_warm": 2.0, "cohort_page_1000_warm": 2.0, "report_pdf": 15.0},
    }
    work = Path(tempfile.mkdtemp(prefix="covidtrack-uibench-"))
    try:
        if args.first_start:
            out["first_start"] = measure_first_start(work / "demo")
            print("first start", out["first_start"], flush=True)
            if out["first_start"]["scans_stored"]:  # type: ignore[index]
                args.demo_home = work / "demo"
        # --- patient store: 6 timepoints on the demo grid -------------------------------------------
        p_home = args.demo_home or work / "patients"
        os.environ["COVIDTRACK_HOME"] = str(p_home)
        with Store.open() as store:
            if args.demo_home is None:
                keys = synthetic.populate_store(store, n_patients=4, n_scans=6, shape=(72, 128, 128))
                data_desc = "synthetic store: 4 patients x 6 timepoints on a 72x128x128 grid, masks from a geometric generator, metrics by covidtrack.metrics"
            else:
                counts = store.scans().groupby("patient_key").size().sort_values(ascending=False)
                keys = list(counts.index)
                data_desc = f"existing store {p_home.name}: {len(counts)} patients, the shown one has {int(counts.iloc[0])} scans"
            key = keys[0]
            model_tag = ", ".join(sorted(load.patient_frame(store, key)["model_version"].unique()))
            t0 = time.perf_counter()
            data = load.patient_report_data(store, key)
            load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pdf.write_patient_pdf(data, work / "patient.pdf")
        patient_pdf_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pdf.write_patient_pdf(data, work / "patient-mpl.pdf", engine="matplotlib")
        patient_pdf_mpl_s = time.perf_counter() - t0
        out["patient"] = {
            "data": data_desc, "model_version": model_tag, "timepoints": len(data.header.dates),
            "apptest": apptest_times("patient", {"patient": key}),
            "report_pdf_s": {"load_from_store_s": round(load_s, 2), "kaleido_s": round(patient_pdf_s, 2), "matplotlib_s": round(patient_pdf_mpl_s, 2)},
        }
        print("patient", out["patient"], flush=True)

        # --- cohort store: 1,000 patients ------------------------------------------------------------
        c_home = args.cohort_home or work / "cohort"
        os.environ["COVIDTRACK_HOME"] = str(c_home)
        with Store.open() as store:
            t0 = time.perf_counter()
            n_scans = store.counts()["scans"] or bulk_cohort(store, args.cohort_patients)
            insert_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            cohort = load.cohort_frame(store)
            query_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pdf.write_cohort_pdf(cohort, work / "cohort.pdf")
        cohort_pdf_s = time.perf_counter() - t0
        out["cohort"] = {
            "data": f"synthetic metric rows: {args.cohort_patients} patients, {n_scans} scans, {len(cohort)} rows used by the page "
                    "(POI rising to a peak near day 10 then falling; arm B 40 % lower peak)",
            "insert_s": round(insert_s, 1), "cohort_query_s": round(query_s, 3),
            "apptest": apptest_times("cohort", {}),
            "report_pdf_s": round(cohort_pdf_s, 2),
        }
        print("cohort", out["cohort"], flush=True)

        # --- browser: warm page loads + screenshots ---------------------------------------------------
        if CHROMIUM and CHROMEDRIVER:
            last = {"import": "Server folder or manifest"}
            for name, home, pages in (("patient", p_home, [f"patient?patient={key}", "", "import", "report"]), ("cohort", c_home, ["cohort"])):
                server = Server(home)
                driver = browser()
                try:
                    timings = {}
                    for page in pages:
                        label = page.split("?")[0] or "patients"
                        driver.execute_cdp_cmd("Performance.enable", {})  # type: ignore[attr-defined]
                        cold = timed_load(driver, server, f"{server.url}/{page}", last.get(label, "not a diagnosis"))
                        reload = timed_load(driver, server, f"{server.url}/{page}", last.get(label, "not a diagnosis"))
                        warm = spa_navigate(driver, server, label, last.get(label, "not a diagnosis"))
                        timings[label] = {"first_load": cold, "reload_warm": reload, "in_app_visit_warm": warm}
                        if not (args.screens_home and name == "patient"):
                            screenshot(driver, f"ui_{label}", height=2000 if label in ("patient", "cohort") else 1100)
                            driver.set_window_size(1400, 1800)  # type: ignore[attr-defined]
                    out.setdefault("browser", {})[name] = timings  # type: ignore[union-attr]
                finally:
                    driver.quit()  # type: ignore[attr-defined]
                    shutil.rmtree(driver._covidtrack_profile, ignore_errors=True)  # type: ignore[attr-defined]
                    server.close()
            if args.screens_home:
                screens_from(args.screens_home, last)
                out["screenshots_from"] = f"{args.screens_home.name}: see bench/figures/ui_*.png"
            print("browser", out["browser"], flush=True)
        else:
            out["browser"] = "not measured: chromium / chromedriver absent"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["hardware"]["load_average_at_end"] = [round(v, 1) for v in os.getloadavg()]  # type: ignore[index]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if "first_start" not in out and "first_start" in previous:
        out["first_start"] = previous["first_start"]  # keep the last measured first start
    RESULTS.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
