"""Training code for ECAMP: ``common`` (what both loops share), ``pretrain`` (config, data, loop, export, distill,
SR windows), ``downstream`` (recipes, protocol, loop, the three heads), the presets, phantom data and the demo.

Depends on the library (``ecamp``); the library never imports it. Needs the ``train`` extra
(``pip install "ecamp[train]"``: transformers, tokenizers, PyYAML, scikit-learn, torchmetrics, openai).
"""
