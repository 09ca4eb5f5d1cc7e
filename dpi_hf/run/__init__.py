"""The run layer: recipe → run → report, shared by ``dpi-hf train``, ``compare``, ``sweep`` and ``probe``.

- :mod:`dpi_hf.run.reading`: a recipe file as a mapping (YAML, ``--key value`` overrides, ``${var}`` variables);
- :mod:`dpi_hf.run.recipe`: the validated :class:`~dpi_hf.run.recipe.Recipe` (sections and DPIConfig fields);
- :mod:`dpi_hf.run.model`: the ``model:`` section and model loading;
- :mod:`dpi_hf.run.environment`: offline mode and thread count, applied before anything is loaded;
- :mod:`dpi_hf.run.train`: ``dpi-hf train`` — score, train with DPITrainer, score again, report.

The comparison harness (:mod:`dpi_hf.compare`) builds on the same pieces. Nothing here is imported by
:mod:`dpi_hf` itself; importing this package imports only PyYAML.
"""
