"""Pure stage logic between the connectors and the model: identity, series selection, windows, units, notes.

Installed as :mod:`riskbridge.harmonize`. Nothing here does I/O, so it is tested without servers.
"""
