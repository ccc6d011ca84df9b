"""Batch scoring: a verified model package applied to many patients' images and feature vectors at once.

:class:`Scorer` loads a package (every checksum verified, its feature spec checked against the caller's), then
scores :class:`ScoreRequest` s in batches that mix patients: a torch ``DataLoader`` whose workers read and
preprocess the series (:class:`~riskbridge.model.preprocess.Preprocessor`, cached per series UID) and build the
tabular inputs, with pinned memory and asynchronous copies on CUDA. On CUDA the model runs under autocast
(``amp="auto"``: bfloat16 where the GPU supports it, else float16; ``"off"`` for float32) with a batch size probed to
fit memory (halved on out-of-memory); on the CPU in float32 with a fixed batch size. :class:`ScoringStats` says how
long the model waited for the loader (:attr:`ScoringStats.wait_share`).

A request without an image is scored with the image modality masked out of the fusion (``present`` False), never
with a zero-filled volume. A request that cannot be scored (its series unreadable, or none of the modalities the
model reads) is never given a score: it is reported as a failure with a specific reason. See docs/model-scoring.md.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from riskbridge.errors import ModelError
from riskbridge.harmonize.features import FeatureSpec, FeatureVector
from riskbridge.harmonize.volume import VolumeError
from riskbridge.model.network import MODALITIES, FusionNet
from riskbridge.model.package import ModelPackage, ModelPackageError, load_package, tabular_tensors
from riskbridge.model.preprocess import Preprocessor
from riskbridge.records import uid_hash

log = logging.getLogger(__name__)

# Batch size on the CPU: larger batches gain little there (the measured 3D encoder: 0.33 vs 0.44 s per volume at
# batch 4 vs 1) and cost memory.
CPU_BATCH_SIZE = 8
# First batch size tried on CUDA; halved until a forward pass of that many volumes fits.
CUDA_PROBE_BATCH_SIZE = 64
# Autocast choices: auto (CUDA: bf16 where supported, else fp16; the CPU: off), off (float32), or a dtype.
AMP_MODES = ("auto", "off", "bf16", "fp16")


class ScoringError(ModelError, RuntimeError):
    """Some requests could not be scored; ``failures`` maps each one's key to its reason."""

    def __init__(self, failures: Mapping[str, str]) -> None:
        self.failures = dict(failures)
        sample = "; ".join(f"{key}: {reason}" for key, reason in list(self.failures.items())[:3])
        super().__init__(f"{len(self.failures)} request(s) could not be scored ({sample})")


@dataclass(frozen=True)
class ScoreRequest:
    """One (patient, study) to score: its staged series (None when it has no usable image) and feature vector."""

    key: str
    series_dir: Path | None
    series_uid: str | None
    vector: FeatureVector

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types: the line format of ``riskbridge score``'s input."""
        return {
            "key": self.key,
            "series_dir": None if self.series_dir is None else str(self.series_dir),
            "series_uid": self.series_uid,
            "vector": {
                "spec": self.vector.spec,
                "names": list(self.vector.names),
                "values": list(self.vector.values),
                "observed": list(self.vector.observed),
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> ScoreRequest:
        """Parse :meth:`to_json`'s output; ValueError naming the first thing that is wrong."""
        if not isinstance(data, dict):
            raise ValueError("a request is a JSON object")
        unknown = sorted(set(data) - {"key", "series_dir", "series_uid", "vector"})
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        key = data.get("key")
        if not isinstance(key, str) or not key:
            raise ValueError("key must be a non-empty string")
        series_dir, series_uid = data.get("series_dir"), data.get("series_uid")
        if series_dir is not None and not isinstance(series_dir, str):
            raise ValueError("series_dir must be a string or null")
        if series_uid is not None and not isinstance(series_uid, str):
            raise ValueError("series_uid must be a string or null")
        raw = data.get("vector")
        if not isinstance(raw, dict) or set(raw) != {"spec", "names", "values", "observed"}:
            raise ValueError("vector must be an object with exactly spec, names, values and observed")
        names, values, observed = raw["names"], raw["values"], raw["observed"]
        if not (isinstance(names, list) and isinstance(values, list) and isinstance(observed, list)):
            raise ValueError("vector names, values and observed must be lists")
        if not len(names) == len(values) == len(observed):
            raise ValueError("vector names, values and observed must have the same length")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError("vector values must be finite numbers (missing values are imputed, observed false)")
        if not all(isinstance(v, bool) for v in observed):
            raise ValueError("vector observed must be booleans")
        vector = FeatureVector(
            str(raw["spec"]), tuple(str(n) for n in names), tuple(float(v) for v in values), tuple(observed)
        )
        return cls(key, None if series_dir is None else Path(series_dir), series_uid, vector)


@dataclass(frozen=True)
class ScoreResult:
    """The score of one request: calibrated and raw probability, and the fusion's weight on each modality."""

    key: str
    probability: float
    raw_probability: float
    attention: dict[str, float]  # {"image": .., "labs": .., "notes": ..}; 0 for a modality the patient lacks


@dataclass
class ScoringStats:
    """Where the time of the last :meth:`Scorer.score` call went (for the benchmark and the logs).

    ``loader_wait_s`` is the time the model step waited for the loader's next batch (the sum of ``batch_waits_s``);
    ``model_s`` the forward passes including the copy to the device and the results back (so the device work is
    finished); ``total_s`` the whole call, which also holds the bookkeeping between batches (:attr:`other_s`).
    """

    requests: int = 0
    images: int = 0
    batches: int = 0
    failures: int = 0
    loader_wait_s: float = 0.0
    model_s: float = 0.0
    total_s: float = 0.0
    batch_waits_s: list[float] = field(default_factory=list)
    device: str = ""
    amp: str = "float32"  # the autocast dtype, or float32 without autocast

    @property
    def other_s(self) -> float:
        """The time that was neither waiting for the loader nor the model step (results, progress callbacks)."""
        return max(0.0, self.total_s - self.loader_wait_s - self.model_s)

    @property
    def wait_share(self) -> float:
        """The share of the whole call the model waited for the loader (0 when nothing was timed)."""
        return self.loader_wait_s / self.total_s if self.total_s > 0 else 0.0

    @property
    def steady_wait_share(self) -> float:
        """:attr:`wait_share` after the first batch: the first wait holds the workers' start-up and the first
        volumes, which no loader can hide; a model fed fast enough waits close to 0 of the rest."""
        if not self.batch_waits_s:
            return 0.0
        rest = self.total_s - self.batch_waits_s[0]
        return sum(self.batch_waits_s[1:]) / rest if rest > 0 else 0.0

    @property
    def volumes_per_s(self) -> float:
        """Images encoded per second of the whole call."""
        return self.images / self.total_s if self.total_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types, the derived shares included (for the benchmark's results file)."""
        return {
            "requests": self.requests,
            "images": self.images,
            "batches": self.batches,
            "failures": self.failures,
            "device": self.device,
            "amp": self.amp,
            "total_s": self.total_s,
            "model_s": self.model_s,
            "loader_wait_s": self.loader_wait_s,
            "other_s": self.other_s,
            "wait_share": self.wait_share,
            "steady_wait_share": self.steady_wait_share,
            "volumes_per_s": self.volumes_per_s,
            "batch_waits_s": list(self.batch_waits_s),
        }


@dataclass
class _Item:
    """One request after the loader worker: its inputs, or why it cannot be scored."""

    index: int
    image: np.ndarray | None
    labs: np.ndarray | None
    notes: np.ndarray | None
    present: tuple[bool, bool, bool]
    error: str | None = None


class RequestDataset(Dataset[_Item]):
    """The requests as a torch Dataset: item ``i`` reads and preprocesses request ``i``'s series (in the worker).

    Failures are items with ``error`` set, not exceptions, so that one bad series never stops a batch.
    """

    def __init__(
        self, requests: Sequence[ScoreRequest], preprocessor: Preprocessor, spec: FeatureSpec, uses: Sequence[bool]
    ) -> None:
        """``uses`` is the model's (image, labs, notes) flags: an image the model never reads is not loaded."""
        self.requests = list(requests)
        self.preprocessor = preprocessor
        self.spec = spec
        self.uses = tuple(uses)

    def __len__(self) -> int:
        """The number of requests."""
        return len(self.requests)

    def __getitem__(self, index: int) -> _Item:
        """Inputs of request ``index``; ``error`` says why there are none."""
        request = self.requests[index]
        labs, notes, has_labs, has_notes = tabular_tensors(self.spec, request.vector)
        image = None
        if request.series_dir is not None and self.uses[0]:
            try:
                image = self.preprocessor.from_series(request.series_dir, request.series_uid)
            except VolumeError as error:
                return _Item(index, None, None, None, (False, False, False), f"image {error}")
            except OSError as error:  # the staged directory vanished or is unreadable
                where = uid_hash(request.series_uid or request.series_dir.name)
                return _Item(index, None, None, None, (False, False, False), f"image: series {where}: {error.strerror}")
        present = (image is not None, has_labs, has_notes)
        if not any(p and u for p, u in zip(present, self.uses, strict=True)):
            wanted = ", ".join(m for m, u in zip(MODALITIES, self.uses, strict=True) if u)
            return _Item(index, None, None, None, present, f"none of the modalities the model reads ({wanted})")
        return _Item(index, image, labs, notes, present)


@dataclass
class _Batch:
    """A collated batch: tensors for the scorable rows, and the failed rows' reasons."""

    indices: torch.Tensor  # [B] request indices of the scorable rows
    labs: torch.Tensor  # [B, 2 * n_labs]
    notes: torch.Tensor  # [B, 2 * n_notes]
    present: torch.Tensor  # [B, 3] bool
    images: torch.Tensor | None  # [n_images, 1, *size], the rows with present[:, 0]
    failures: list[tuple[int, str]]

    def pin_memory(self) -> _Batch:
        """Page-locked copies for fast asynchronous copies to the GPU (the DataLoader calls this)."""
        self.labs, self.notes, self.present = self.labs.pin_memory(), self.notes.pin_memory(), self.present.pin_memory()
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate(items: list[_Item]) -> _Batch:
    """Stack the scorable items of a batch (only the present images: absent ones are masked, never zero-filled)."""
    good = [item for item in items if item.error is None]
    failures = [(item.index, item.error) for item in items if item.error is not None]
    labs = [item.labs for item in good if item.labs is not None]
    notes = [item.notes for item in good if item.notes is not None]
    images = [item.image for item in good if item.image is not None]
    return _Batch(
        indices=torch.tensor([item.index for item in good], dtype=torch.long),
        labs=torch.from_numpy(np.stack(labs)) if labs else torch.zeros((0, 0)),
        notes=torch.from_numpy(np.stack(notes)) if notes else torch.zeros((0, 0)),
        present=torch.tensor([item.present for item in good], dtype=torch.bool).reshape(len(good), 3),
        images=torch.from_numpy(np.stack(images)) if images else None,
        failures=failures,
    )


def _worker_init(_: int) -> None:
    """Loader workers preprocess one volume each: one thread apiece, so N workers use N cores, not N squared."""
    torch.set_num_threads(1)


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; otherwise the named device (ValueError for CUDA without one)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no CUDA device")
    return resolved


def autocast_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``amp`` (one of :data:`AMP_MODES`) on ``device``; None means float32, no autocast.

    ``auto``: on CUDA bfloat16 where the GPU supports it (it keeps float32's range, float16 does not), else
    float16; on the CPU none, since float32 is what the reference numbers were measured in. ``bf16`` also runs on
    the CPU; ``fp16`` is CUDA only (float16 autocast is meant for GPUs; on the CPU bf16 is the reduced precision to
    try). ValueError otherwise.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    cuda = device.type == "cuda"
    if amp == "off" or (amp == "auto" and not cuda):
        return None
    if amp == "fp16" and not cuda:
        raise ValueError("amp fp16 needs a CUDA device (use bf16 or off on the CPU)")
    if amp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp bf16: {torch.cuda.get_device_name(device)} does not support bfloat16 (use fp16)")
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def loader_options(device: torch.device, workers: int) -> dict[str, Any]:
    """The DataLoader settings for ``device``: page-locked batches on CUDA (the copies to the GPU can then run
    asynchronously), none on the CPU (pinning there only costs a copy); with workers, one torch thread each and two
    batches prefetched per worker so the next batch is ready when the model finishes one."""
    return {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "worker_init_fn": _worker_init if workers else None,
        "prefetch_factor": 2 if workers else None,
    }


class Scorer:
    """A verified model package ready to score batches of requests (see the module docstring)."""

    def __init__(
        self,
        package: ModelPackage,
        feature_spec: FeatureSpec,
        *,
        device: str = "auto",
        cache_dir: Path | None = None,
        batch_size: int | None = None,
        workers: int = 0,
        amp: str = "auto",
    ) -> None:
        """Use :meth:`from_package`; this takes an already loaded package and checks the feature spec."""
        package.require_spec(feature_spec)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if workers < 0:
            raise ValueError(f"workers must be 0 or more, got {workers}")
        self.package = package
        self.spec = feature_spec
        self.device = resolve_device(device)
        self.amp_dtype = autocast_dtype(self.device, amp)
        self.workers = workers
        self.preprocessor = Preprocessor(package.config.preprocess, cache_dir=cache_dir)
        self.network: FusionNet = package.build_network().to(self.device)
        self.uses = package.config.uses
        self._requested_batch_size = batch_size
        self._batch_size: int | None = batch_size if self.device.type != "cuda" else None
        self.last_stats = ScoringStats()

    @classmethod
    def from_package(
        cls,
        path: Path,
        feature_spec: FeatureSpec,
        device: str = "auto",
        cache_dir: Path | None = None,
        batch_size: int | None = None,
        workers: int = 0,
        *,
        expected_sha256: str | None = None,
        amp: str = "auto",
    ) -> Scorer:
        """Load and verify the package at ``path`` (every file's sha256, and the whole package's against
        ``expected_sha256`` when given), check it was trained on ``feature_spec``; ModelPackageError otherwise.
        ``amp`` is one of :data:`AMP_MODES` (see :func:`autocast_dtype`)."""
        return cls(
            load_package(Path(path), expected_sha256=expected_sha256),
            feature_spec,
            device=device,
            cache_dir=cache_dir,
            batch_size=batch_size,
            workers=workers,
            amp=amp,
        )

    @property
    def model_name(self) -> str:
        """The package's model name."""
        return self.package.config.name

    @property
    def model_version(self) -> str:
        """The package's model version."""
        return self.package.config.version

    @property
    def sha256(self) -> str:
        """The package's sha256 (of its SHA256SUMS, so of every file)."""
        return self.package.sha256

    @property
    def batch_size(self) -> int:
        """Requests per batch: the caller's, else CPU_BATCH_SIZE on the CPU or the probed size on CUDA."""
        if self._batch_size is None:
            self._batch_size = self._probe_batch_size()
        return self._batch_size

    def score(
        self, requests: Sequence[ScoreRequest], progress: Callable[[int, int], None] | None = None
    ) -> list[ScoreResult]:
        """Score every request, in the order given; ScoringError (with every failure's reason) if any cannot be."""
        results, failures = self.score_with_failures(requests, progress)
        if failures:
            raise ScoringError(failures)
        return results

    def score_with_failures(
        self, requests: Sequence[ScoreRequest], progress: Callable[[int, int], None] | None = None
    ) -> tuple[list[ScoreResult], dict[str, str]]:
        """Score what can be scored; return the results (in request order) and ``{key: reason}`` for the rest.

        Vectors built by another feature spec are a ModelPackageError before anything is scored (a caller's
        error, not a patient's). ``progress(done, total)`` is called after each batch.
        """
        keys = [request.key for request in requests]
        if len(set(keys)) != len(keys):
            raise ValueError("request keys must be unique")
        wrong = [request.key for request in requests if request.vector.spec != self.spec.label]
        if wrong:
            raise ModelPackageError(
                f"{len(wrong)} request(s) carry vectors built by another feature spec than the model's "
                f"{self.spec.label} (first: {wrong[0]})"
            )
        amp = "float32" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch.")
        stats = ScoringStats(requests=len(requests), device=str(self.device), amp=amp)
        self.last_stats = stats
        started = time.perf_counter()
        scored: dict[int, ScoreResult] = {}
        failures: dict[int, str] = {}
        done = 0
        for wait, batch in self._batches(requests):
            stats.loader_wait_s += wait
            stats.batch_waits_s.append(wait)
            stats.batches += 1
            step_start = time.perf_counter()
            for index, reason in batch.failures:
                failures[index] = reason
            if len(batch.indices):
                for index, result in zip(batch.indices.tolist(), self._forward(batch, requests), strict=True):
                    scored[index] = result
                stats.images += int(batch.present[:, 0].sum())
            stats.model_s += time.perf_counter() - step_start
            done += len(batch.indices) + len(batch.failures)
            if progress is not None:
                progress(done, len(requests))
        stats.failures = len(failures)
        stats.total_s = time.perf_counter() - started
        log.info(
            "scored %d request(s), %d image(s) in %d batch(es) on %s (%s) in %.2f s: model step %.2f s, waited for "
            "the loader %.2f s (%.0f%%, %.0f%% after the first batch)",
            stats.requests - stats.failures,
            stats.images,
            stats.batches,
            stats.device,
            stats.amp,
            stats.total_s,
            stats.model_s,
            stats.loader_wait_s,
            100 * stats.wait_share,
            100 * stats.steady_wait_share,
        )
        for index, reason in sorted(failures.items()):
            log.warning("not scored: request %d: %s", index, reason)
        results = [scored[index] for index in sorted(scored)]
        return results, {requests[index].key: reason for index, reason in sorted(failures.items())}

    def loader(self, requests: Sequence[ScoreRequest]) -> DataLoader[_Item]:
        """The DataLoader over the requests: workers preprocess, batches mix patients, pinned memory on CUDA
        (:func:`loader_options`)."""
        dataset = RequestDataset(requests, self.preprocessor, self.spec, self.uses)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=collate,
            **loader_options(self.device, self.workers),
        )

    def _batches(self, requests: Sequence[ScoreRequest]) -> Iterator[tuple[float, _Batch]]:
        """Yield ``(seconds waited for it, batch)``: the wait is the time the model had nothing to do."""
        iterator = iter(self.loader(requests))
        while True:
            waited = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            yield time.perf_counter() - waited, batch

    def autocast(self) -> AbstractContextManager[Any]:
        """Autocast in :attr:`amp_dtype` (by default on CUDA only), or nothing (float32)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @torch.inference_mode()
    def _forward(self, batch: _Batch, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Run one batch through the network; on CUDA out-of-memory, the two halves one after the other."""
        try:
            logits, attention = self._run(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch.indices) == 1:
                raise
            torch.cuda.empty_cache()
            self._batch_size = max(1, len(batch.indices) // 2)
            log.warning("CUDA out of memory at %d requests per batch; now %d", len(batch.indices), self._batch_size)
            first, second = _split(batch)
            return self._forward(first, requests) + self._forward(second, requests)
        probabilities = self.package.calibrate(logits).tolist()
        raw = torch.sigmoid(logits).tolist()
        weights = attention.tolist()
        return [
            ScoreResult(
                key=requests[index].key,
                probability=float(probability),
                raw_probability=float(raw_probability),
                attention={m: float(w) for m, w in zip(MODALITIES, row, strict=True)},
            )
            for index, probability, raw_probability, row in zip(
                batch.indices.tolist(), probabilities, raw, weights, strict=True
            )
        ]

    def _run(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and attention (float32, on the CPU) of one batch; images encoded only for rows that have one."""
        device = self.device
        non_blocking = device.type == "cuda"
        present = batch.present.to(device, non_blocking=non_blocking)
        labs = batch.labs.to(device, non_blocking=non_blocking)
        notes = batch.notes.to(device, non_blocking=non_blocking)
        with self.autocast():
            embedding = None
            if batch.images is not None and self.uses[0]:
                encoded = self.network.encode_image(batch.images.to(device, non_blocking=non_blocking))
                # rows without an image keep a placeholder the network never reads: present[:, 0] masks them out
                embedding = encoded.new_zeros((len(batch.indices), encoded.shape[1]))
                embedding[present[:, 0]] = encoded
            output = self.network(None, labs, notes, present, image_embedding=embedding)
        return output.logits.float().cpu(), output.attention.float().cpu()

    def _probe_batch_size(self) -> int:
        """CPU: the caller's size or CPU_BATCH_SIZE. CUDA: halve from CUDA_PROBE_BATCH_SIZE until a batch fits."""
        if self.device.type != "cuda":
            return self._requested_batch_size or CPU_BATCH_SIZE
        size = self._requested_batch_size or CUDA_PROBE_BATCH_SIZE
        if not self.uses[0]:
            return size
        shape = (1, *self.package.config.preprocess.size)
        while True:
            try:
                with torch.inference_mode(), self.autocast():
                    self.network.encode_image(torch.zeros((size, *shape), device=self.device))
                torch.cuda.synchronize(self.device)
                log.info("scoring batch size %d fits on %s", size, torch.cuda.get_device_name(self.device))
                return size
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if size == 1:
                    raise
                size //= 2


def _split(batch: _Batch) -> tuple[_Batch, _Batch]:
    """The first and second half of a batch's rows (images follow their rows)."""
    half = len(batch.indices) // 2
    image_rows = batch.present[:, 0]
    images_before = int(image_rows[:half].sum())
    parts = []
    for rows, image_slice in (
        (slice(0, half), slice(0, images_before)),
        (slice(half, None), slice(images_before, None)),
    ):
        images = batch.images[image_slice] if batch.images is not None else None
        parts.append(
            _Batch(
                indices=batch.indices[rows],
                labs=batch.labs[rows],
                notes=batch.notes[rows],
                present=batch.present[rows],
                images=images if images is not None and len(images) else None,
                failures=[],
            )
        )
    return parts[0], parts[1]


def default_workers() -> int:
    """Loader workers for the CLI: the cores but one, at most 8 (0 on a one-core machine: load in-process)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))
