"""Evaluation of a compressed model against its original.

- :mod:`.quality`: perplexity, KL divergence and top-1 agreement on token windows.
- :mod:`.speed`: decode tokens/s and peak memory, each model in a process of its own.
- :mod:`.lmeval` and :mod:`.tasks`: lm-evaluation-harness runs and the offline task sets.
- :mod:`.report`: one run's report (JSON + markdown); :mod:`.comparison` several runs side by
  side; :mod:`.html` the HTML page with plots.
"""
