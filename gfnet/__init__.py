"""Glance and focus on LSNet: its data, the three training stages and their evaluation.

The model is :mod:`model.glance_focus`; what inference needs as well lives below :mod:`inference`: the views and
crops (:mod:`data.glance_views`), the model folder (:mod:`artifacts.glance_focus_folder`), the compute per step
(:mod:`perf.glance_focus`), the exit rules (:mod:`inference.early_exit`) and the predictor
(:func:`inference.glance_focus_predictor.load_glance_focus`).
"""
