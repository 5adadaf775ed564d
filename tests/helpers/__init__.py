"""Helpers shared by the test modules (none of them is a test module itself).

``tests/conftest.py`` puts ``tests/`` on ``sys.path``, so test modules import these as ``from helpers.X import Y``.

* :mod:`helpers.builders`: tiny models, batches, configuration overrides, DICOM files and Hub manifests;
* :mod:`helpers.loopback_hub`: a loopback Hugging Face Hub (a real HTTP server on 127.0.0.1);
* :mod:`helpers.drive_server`: a loopback Google Drive for ``gdown``;
* :mod:`helpers.iu_reports`: the Indiana University reports shipped inside the torchxrayvision wheel;
* :mod:`helpers.text_reference`: a per-token reference implementation of the masking and weighting rules;
* :mod:`helpers.smoke_wheel`: the smoke test of an installed wheel, a script run by ``.ci/wheel_smoke.sh``
  (it imports nothing from this package, since it runs with ``python -I``).
"""
