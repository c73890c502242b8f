"""covidtrack dashboard: ``streamlit run app.py``. A router only; pages live in covidtrack/ui/pages."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from covidtrack.errors import CovidtrackError
from covidtrack.ui import resources, startup

HERE = Path(__file__).resolve().parent
PAGES = Path("covidtrack/ui/pages")

# (file, title, icon, url); pages whose file is absent (not installed yet) are skipped.
ROUTES = [
    ("patients.py", "Patients", ":material/groups:", "patients"),
    ("patient.py", "Patient timeline", ":material/timeline:", "patient"),
    ("cohort.py", "Cohort", ":material/query_stats:", "cohort"),
    ("import_data.py", "Import", ":material/upload:", "import"),
    ("report.py", "Report", ":material/picture_as_pdf:", "report"),
    ("review.py", "Review", ":material/edit:", "review"),
    ("models.py", "Models", ":material/model_training:", "models"),
]

st.set_page_config(page_title="covidtrack", page_icon=":material/pulmonology:", layout="wide")
try:
    if startup.gate():
        pages = [
            st.Page(PAGES / name, title=title, icon=icon, url_path=url)
            for name, title, icon, url in ROUTES
            if (HERE / PAGES / name).exists()
        ]

        def home() -> None:  # "/" opens the first page under its own address, so /patients links work too
            st.switch_page(pages[0], query_params=st.query_params.to_dict())  # keep ?patient=... and the like

        nav = st.navigation([st.Page(home, title="Home", url_path="home", default=True), *pages], position="hidden")
        with st.sidebar:  # the menu, without the "Home" redirect entry
            for page in pages:
                st.page_link(page)
            st.divider()
        try:
            nav.run()
        except CovidtrackError as err:  # typed errors name the file and the fix: show them, no traceback
            st.error(str(err))
finally:  # also on st.stop / st.rerun: the store is held only while a page runs
    resources.release()
