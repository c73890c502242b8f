"""Trend reports: plotly figures shared by the dashboard and the PDF, cohort statistics, the PDF writer.

Nothing here imports streamlit. Heavy pieces (kaleido, fpdf2, SimpleITK) are imported where used.
"""
