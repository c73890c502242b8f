"""Human in the loop: review, correct, retrain, version and promote the infection model.

- :mod:`covidtrack.hitl.corrections`: edit operations on a mask slice (pure numpy), the undoable
  :class:`~covidtrack.hitl.corrections.EditSession` with effort accounting, and
  :func:`~covidtrack.hitl.corrections.save_correction` (a NEW record; model output untouched);
- :mod:`covidtrack.hitl.importing`: corrected masks made in 3D Slicer / ITK-SNAP (NIfTI) with
  lookup tables for their usual label numbering;
- :mod:`covidtrack.hitl.active`: active-learning score (mean predictive entropy inside the lungs)
  and the review queue;
- :mod:`covidtrack.hitl.retrain`: fine-tuning on corrected scans in a background process with a
  JSON status file, immutable version folders, old-vs-new evaluation on a fixed validation set,
  explicit promotion, rollback and re-segmentation of stored scans.

Nothing here imports streamlit; torch is imported inside the functions that need it.
"""
