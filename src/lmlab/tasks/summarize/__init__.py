"""Dialogue summarization: data (DialogSum formats + a bundled sample), ROUGE scoring, and the lab.

* ``data``         ``Dialogue`` records, ``load_dialogues(source)`` for the bundled sample, JSONL, CSV, ``hf:ID``
* ``rouge``        ROUGE-1/2/L/Lsum F-measures against one or several references (best and mean aggregation)
* ``experiments``  named experiments = prompt recipe + GenerationConfig (``zero-shot-bare``, ``few-shot``, ...)
* ``lab``          ``run_lab(LabSettings)``: generate, score, resume, and write the report
* ``report``       terminal tables, ``report.md`` and ``rouge.png``
"""
