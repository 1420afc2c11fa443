"""Alignment with human feedback: preference pairs, a reward model, best-of-n sampling (and DPO, in
``lmlab.objectives.dpo``).

``prefs``   the preference-pair JSONL format (read, validate, append) and ``lmlab prefs build/label``.
"""
