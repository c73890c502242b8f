"""The Streamlit dashboard: the only package of covidtrack that imports streamlit.

``app.py`` routes to the pages in :mod:`covidtrack.ui.pages`; cached resources live in
:mod:`covidtrack.ui.resources`; helpers without streamlit (safe upload handling) in
:mod:`covidtrack.ui.uploads`.
"""
