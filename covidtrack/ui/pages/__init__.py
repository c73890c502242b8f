"""Dashboard pages. Each file is a Streamlit page script that ``app.py`` routes to."""
