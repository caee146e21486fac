"""Glance and focus on LSNet: crop geometry, data, the three training stages, early exit, evaluation, inference.

The model itself is :mod:`model.glance_focus`; :func:`gfnet.api.load_glance_focus` loads a trained model folder.
"""
