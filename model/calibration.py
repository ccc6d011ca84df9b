"""Post-hoc calibration of the fusion model's logits: temperature scaling or Platt scaling (docs/model.md).

Both map a logit ``z`` to ``sigmoid(a * z + b)``: temperature scaling fits ``a = 1 / T`` with ``b = 0`` (one
parameter, keeps the ranking and the 0.5 point), Platt scaling fits ``a`` and ``b``. They are fitted by minimising
the negative log-likelihood on a calibration split that the network was not trained on (never on a test fold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize

Method = Literal["temperature", "platt", "none"]
METHODS = ("temperature", "platt", "none")


@dataclass(frozen=True)
class Calibrator:
    """``probability = sigmoid(scale * logit + bias)``; ``method`` says how scale and bias were fitted."""

    method: Method
    scale: float = 1.0
    bias: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (math.isfinite(self.scale) and math.isfinite(self.bias)):
            raise ValueError("calibration scale and bias must be finite")

    @property
    def temperature(self) -> float | None:
        """``T = 1 / scale`` for temperature scaling, else None."""
        return 1.0 / self.scale if self.method == "temperature" and self.scale else None

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of an array of logits (float64)."""
        z = self.scale * np.asarray(logits, dtype=np.float64) + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the package's calibration.json)."""
        return {"method": self.method, "scale": self.scale, "bias": self.bias}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        """Rebuild from :meth:`to_dict`'s output."""
        return cls(str(data["method"]), float(data["scale"]), float(data["bias"]))  # type: ignore[arg-type]


def _nll(params: np.ndarray, logits: np.ndarray, labels: np.ndarray, platt: bool) -> tuple[float, np.ndarray]:
    scale = params[0]
    bias = params[1] if platt else 0.0
    z = scale * logits + bias
    # log(1 + exp(z)) - y z, stable for large |z|
    loss = float(np.mean(np.logaddexp(0.0, z) - labels * z))
    residual = 1.0 / (1.0 + np.exp(-z)) - labels
    grad = np.array([np.mean(residual * logits), np.mean(residual)])
    return loss, grad if platt else grad[:1]


def fit_calibrator(logits: np.ndarray, labels: np.ndarray, method: Method = "temperature") -> Calibrator:
    """Fit ``method`` on held-out logits and 0/1 labels; ValueError when the split cannot support a fit."""
    if method == "none":
        return Calibrator("none")
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.shape != y.shape or z.size == 0:
        raise ValueError("calibration needs as many labels as logits, and at least one")
    if not np.all(np.isfinite(z)):
        raise ValueError("calibration logits must be finite")
    if len(np.unique(y)) < 2:
        raise ValueError("the calibration split holds only one class; it cannot be calibrated")
    platt = method == "platt"
    start = np.array([1.0, 0.0]) if platt else np.array([1.0])
    bounds = [(1e-3, 100.0), (-20.0, 20.0)] if platt else [(1e-3, 100.0)]
    result = minimize(_nll, start, args=(z, y, platt), jac=True, method="L-BFGS-B", bounds=bounds)
    scale = float(result.x[0])
    bias = float(result.x[1]) if platt else 0.0
    return Calibrator(method, scale, bias)
