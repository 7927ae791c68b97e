"""FLES-1 tooling shared by the CLIs: checkpoint conversion, data, evaluation, training, model card.

The model itself lives in the two Hub-shipped files at the project root (``configuration_fles1.py``,
``modeling_fles1.py``) and the encoder in ``fles1_encoder.py``.
"""

import os

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the Hub files, recipes, model_card/
