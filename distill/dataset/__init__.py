"""Training sets for one call path: ``arbitrage distill build PATH``.

Modules, in pipeline order: ``config`` (BuildConfig), ``source`` (captured examples),
``filters`` (duplicates, refusals, output check), ``teacher`` and ``cache`` (relabelling under
a hard budget, resumable), ``split`` (deterministic train/eval), ``writer`` (Parquet, exports,
manifest, versions), ``build`` (the pipeline).
"""
