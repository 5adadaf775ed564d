"""The authors' entity list and boilerplate templates (dossier sections 4.3 and 4.5).

The list is kept exactly as published, including ``COPD`` in upper case: the tokenizer lower-cases text, so that
entry can never match (nor can ``aerate`` and ``hyperinflate``, which are not vocabulary tokens).
``MaskingConfig(lowercase_entities=True)`` makes ``copd`` match.
"""

ENTITIES: tuple[str, ...] = (
    "abnormality", "abscess", "aerate", "aorta", "atelectasis", "bronchiectasis", "calcification",
    "cardiomediastinal", "cardiomegaly", "catheter", "chf", "collapse", "congestion", "consolidation", "contour",
    "COPD", "deformity", "dilation", "distention", "edema", "effusion", "embolism", "emphysema", "engorgement",
    "fibrosis", "fracture", "granuloma", "hernia", "hilar", "hyperinflate", "hemidiaphragm", "infiltrate", "mass",
    "nodule", "obscure", "opacity", "perihilar", "pneumonia", "pneumothorax", "sarcoidosis", "silhouette",
    "thickening", "tuberculosis", "vasculature",
)

# Token sequences whose loss weight is lowered: checked longest first, non-overlapping, left to right.
TEMPLATES: tuple[tuple[str, ...], ...] = (
    ("there", "is", "no", "evidence", "of"),
    ("there", "is", "no"),
)
