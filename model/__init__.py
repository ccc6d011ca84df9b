"""The fusion model: MONAI image encoder + tabular encoder, training, calibration and batch scoring.

Installed as :mod:`riskbridge.model`. Import torch and MONAI only inside this package, never from DAG files.
"""
