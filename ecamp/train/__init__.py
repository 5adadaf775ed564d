"""Training code for ECAMP: data, phantom data, the pre-training loop, checkpoints, export and the demo.

Depends on the library (``ecamp``); the library never imports it. Needs the ``train`` extra
(``pip install "ecamp[train]"``: PyYAML, scikit-learn).
"""
