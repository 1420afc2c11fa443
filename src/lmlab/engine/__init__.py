"""Compiled decode steps: one per model and shape bucket, cached on disk (see ``aoti.py``)."""
