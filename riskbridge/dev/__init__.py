"""Development tools: what tests, benchmarks and demos need, and a deployment never runs.

- :mod:`riskbridge.dev.synth`: the deterministic synthetic cohort (CT studies, labs, notes) with exact ground truth,
  and its loader into Orthanc and HAPI FHIR (``riskbridge synth``).
- :mod:`riskbridge.dev.sandbox`: the loopback Orthanc, HAPI FHIR and PostgreSQL servers (``riskbridge sandbox``).
- :mod:`riskbridge.dev.demo`: the README demo, sandbox to RiskAssessments on one machine (``riskbridge demo``).
- :mod:`riskbridge.dev.training_table`: a training table built from the synthetic cohort (``riskbridge train`` when
  its table directory is empty, bench/fusion.py).
- :mod:`riskbridge.dev.cli`: the sandbox, synth and demo commands, which the ``riskbridge`` command line registers.

Runtime modules (the pipeline, its stages, connectors, harmonization, the model) never import this subpackage; only
the command line's entry point does. Its submodules are not imported here: import the one you need.
"""

from __future__ import annotations

__all__ = ["cli", "demo", "sandbox", "synth", "training_table"]
