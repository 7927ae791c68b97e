"""FLES-1 training: the recipe trainer behind ``train_fles1.py``.

- :mod:`~fles1.training.losses` -- InfoNCE over sparse dot products (formula in its docstring)
- :mod:`~fles1.training.regularizers` -- L1 FLOPS, classic squared FLOPS, anti-collapse
- :mod:`~fles1.training.clfr` -- the CLFR lambda_d controller (+ callbacks for FLES1Trainer and SparseEncoderTrainer)
- :mod:`~fles1.training.crashes` -- crash definitions, skipping and counting
- :mod:`~fles1.training.data` -- BEIR / triples -> (query, positive, negative_1..n) datasets
- :mod:`~fles1.training.trainer` -- FLES1Trainer (transformers.Trainer subclass)
- :mod:`~fles1.training.recipe`, :mod:`~fles1.training.run`, :mod:`~fles1.training.plots` -- recipes, one run, PNGs
- :mod:`~fles1.training.checks` -- the type tests the settings share (a bool is not a number)
"""
