"""covidtrack: follow COVID-19 lung infection on serial chest CT.

The library never imports streamlit; the dashboard lives in :mod:`covidtrack.ui`.
"""

__version__ = "0.1.0"
