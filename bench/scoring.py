"""Benchmark: batch scoring, load -> preprocess -> model, in volumes per second, with each stage timed on its own.

Synthetic CT series (bench/volume.py's phantom: int16, realistic header, shuffled InstanceNumbers) are written with
pydicom into a temporary directory and scored with a model package of the reference architecture (seeded random
weights unless ``--package`` names a trained one: the speed does not depend on the weights). In the same run:

* preprocessing of one loaded volume: MONAI's transforms in lazy mode (one resample; riskbridge) against the same
  transforms eager (one resample per transform; the reference), checked to agree;
* the loader alone (read + preprocess + tabular inputs, collated), with 0 workers (the reference) and N workers;
* the model alone on preloaded batches (CPU float32, or CUDA with autocast);
* end to end (:meth:`Scorer.score`), 0 and N workers: volumes/s and the time the model step waited for the loader.
  On CUDA it also samples GPU utilization in a thread, and says whether the GPU waited on the loader.

The preprocessing cache is off (every request reads its series), so the loader's real cost is measured.
Results go to docs/benchmarks.md (section "scoring").

Run: ``python bench/scoring.py [--series 4] [--requests 16] [--slices 160] [--size 512] [--workers N]
[--batch-size B] [--device auto] [--package DIR] [--no-write]``. On a GPU machine use enough requests for several
batches, e.g. ``--series 8 --requests 512 --batch-size 32``, so that the steady state is measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section
from volume import write_series

from riskbridge.harmonize.features import FeatureSpec, FeatureVector, build_vector, load_default_feature_spec
from riskbridge.model.calibration import Calibrator
from riskbridge.model.data import DEFAULT_PREPROCESS
from riskbridge.model.network import FusionNet, ModelConfig
from riskbridge.model.package import lab_feature_names, save_package
from riskbridge.model.preprocess import PreprocessConfig, Preprocessor
from riskbridge.model.scoring import Scorer, ScoreRequest
from riskbridge.model.volume_io import load_series_volume

WAIT_COLUMNS = ["loader", "model step s", "loader wait s", "steady wait share", "median wait per batch s", "GPU util"]
# Two threads at most for the model on a shared CPU machine (the project's rule); a GPU run is unaffected.
CPU_THREADS = 2


def make_package(directory: Path, spec: FeatureSpec) -> Path:
    """A package of the reference architecture (detector encoder, 3 mm input) with seeded random weights."""
    config = ModelConfig(
        name="bench",
        version="0",
        strategy="hybrid",
        feature_spec=spec.label,
        lab_features=lab_feature_names(spec),
        note_features=spec.flags,
        preprocess=DEFAULT_PREPROCESS,
        image_encoder="detector",
    )
    torch.manual_seed(0)
    save_package(directory, config, FusionNet(config), Calibrator("temperature"), {"training": {"synthetic": True}})
    return directory


def feature_vector(spec: FeatureSpec, seed: int) -> FeatureVector:
    """A plausible, fully observed feature vector."""
    rng = np.random.default_rng(seed)
    labs = {lab.name: float(rng.uniform(1.0, 100.0)) for lab in spec.labs}
    flags = {flag: bool(rng.integers(0, 2)) for flag in spec.flags}
    return build_vector(spec, labs, flags, {"age_years": 65.0, "sex_male": 1.0})


def preprocess_times(series: Path, config: PreprocessConfig, repeat: int) -> tuple[float, float, float, float]:
    """Best-of-``repeat`` seconds to load one series, and to preprocess the loaded volume lazily and eagerly;
    and the largest difference between the lazy and eager outputs."""
    best_load = best_lazy = best_eager = float("inf")
    lazy, eager = Preprocessor(config, lazy=True), Preprocessor(config, lazy=False)
    outputs: dict[str, np.ndarray] = {}
    for _ in range(repeat):
        start = time.perf_counter()
        volume = load_series_volume(series)
        best_load = min(best_load, time.perf_counter() - start)
        for name, preprocessor in (("lazy", lazy), ("eager", eager)):
            copy = volume.clone()
            start = time.perf_counter()
            outputs[name] = preprocessor._run(copy)  # the transforms alone, on an already loaded volume
            seconds = time.perf_counter() - start
            if name == "lazy":
                best_lazy = min(best_lazy, seconds)
            else:
                best_eager = min(best_eager, seconds)
    difference = float(np.abs(outputs["lazy"] - outputs["eager"]).max())
    return best_load, best_lazy, best_eager, difference


def loader_rate(scorer: Scorer, requests: list[ScoreRequest]) -> float:
    """Volumes per second the loader delivers with nothing consuming them (start-up of workers included)."""
    start = time.perf_counter()
    volumes = 0
    for batch in scorer.loader(requests):
        volumes += 0 if batch.images is None else len(batch.images)
    return volumes / (time.perf_counter() - start)


def model_rate(scorer: Scorer, volumes: int) -> float:
    """Volumes per second through the network alone, on preloaded batches (warm-up batch untimed)."""
    size = scorer.batch_size
    shape = (size, 1, *scorer.package.config.preprocess.size)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(shape, generator=generator)
    n_labs, n_notes = 2 * len(scorer.package.config.lab_features), 2 * len(scorer.package.config.note_features)
    labs, notes = torch.rand((size, n_labs), generator=generator), torch.rand((size, n_notes), generator=generator)
    present = torch.ones((size, 3), dtype=torch.bool)
    device = scorer.device
    if device.type == "cuda":
        images, labs, notes = images.pin_memory(), labs.pin_memory(), notes.pin_memory()

    def step() -> None:
        with torch.inference_mode(), scorer.autocast():
            output = scorer.network(
                images.to(device, non_blocking=True),
                labs.to(device, non_blocking=True),
                notes.to(device, non_blocking=True),
                present.to(device),
            )
            output.logits.float().cpu()

    step()
    batches = max(1, volumes // size)
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * size / (time.perf_counter() - start)


class GpuSampler:
    """Samples GPU utilization (%) every ``interval`` seconds in a thread: torch.cuda.utilization (NVML), else
    nvidia-smi."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.source = "torch.cuda.utilization"

    def _sample(self) -> float:
        if self.source == "torch.cuda.utilization":
            try:
                return float(torch.cuda.utilization())
            except Exception:  # no pynvml / NVML: fall back to the command line tool
                self.source = "nvidia-smi"
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "--id=0"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout
        return float(output.split()[0])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._sample())
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                self.source = "unavailable"
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def end_to_end(scorer: Scorer, requests: list[ScoreRequest]) -> dict[str, float]:
    """Score all requests; return volumes/s, loader wait (all, and after the first batch), and GPU utilization."""
    sampler = GpuSampler() if scorer.device.type == "cuda" else None
    start = time.perf_counter()
    if sampler is not None:
        with sampler:
            scorer.score(requests)
    else:
        scorer.score(requests)
    seconds = time.perf_counter() - start
    stats = scorer.last_stats
    waits = stats.batch_waits_s
    steady_wait = sum(waits[1:])  # the first batch waits for worker start-up and the first volumes: unavoidable
    steady_time = seconds - waits[0] if waits else seconds
    result = {
        "seconds": seconds,
        "rate": stats.images / seconds,
        "wait": stats.loader_wait_s,
        "model": stats.model_s,
        "steady_wait_share": steady_wait / steady_time if steady_time > 0 else 0.0,
        "median_wait": statistics.median(waits[1:]) if len(waits) > 1 else 0.0,
        "gpu_util": float(np.mean(sampler.samples)) if sampler and sampler.samples else float("nan"),
    }
    return result


def run(arguments: argparse.Namespace) -> str:
    """Run every measurement; return the markdown body of the report section."""
    spec = load_default_feature_spec()
    load_before = os.getloadavg()[0]
    workers = arguments.workers if arguments.workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    with tempfile.TemporaryDirectory(prefix="riskbridge-bench-scoring-") as temporary:
        root = Path(temporary)
        package = arguments.package or make_package(root / "package", spec)
        series = []
        for index in range(arguments.series):
            series.append(write_series(root / f"series-{index}", arguments.slices, arguments.size, seed=index))
            print(f"series {index + 1}/{arguments.series} written", flush=True)
        requests = [
            ScoreRequest(f"p{index}", series[index % len(series)], None, feature_vector(spec, index))
            for index in range(arguments.requests)
        ]
        scorers = {
            count: Scorer.from_package(
                package, spec, device=arguments.device, batch_size=arguments.batch_size, workers=count, cache_dir=None
            )
            for count in (0, workers)
        }
        reference = scorers[0]
        config = reference.package.config.preprocess
        load_s, lazy_s, eager_s, difference = preprocess_times(series[0], config, arguments.repeat)
        print(f"preprocess: load {load_s:.3f} s, lazy {lazy_s:.3f} s, eager {eager_s:.3f} s", flush=True)
        loader = {count: loader_rate(scorer, requests) for count, scorer in scorers.items()}
        print(f"loader: {loader}", flush=True)
        model = model_rate(reference, arguments.requests)
        print(f"model: {model:.2f} volumes/s", flush=True)
        e2e = {count: end_to_end(scorer, requests) for count, scorer in scorers.items()}
        print(f"end to end: {e2e}", flush=True)
        device = reference.device
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {CPU_THREADS} threads"
        amp = str(reference.amp_dtype).replace("torch.", "") if reference.amp_dtype else "float32"
        batch = reference.batch_size
        megabytes = sum(p.stat().st_size for p in series[0].glob("*.dcm")) / 1e6
        shutil.rmtree(root / "package", ignore_errors=True)

    rows = [
        ["load one series (harmonize.volume)", f"{load_s:.3f} s", f"{1 / load_s:.2f}", ""],
        ["preprocess, MONAI eager (reference)", f"{eager_s:.3f} s", f"{1 / eager_s:.2f}", "1.00x"],
        ["preprocess, MONAI lazy (riskbridge)", f"{lazy_s:.3f} s", f"{1 / lazy_s:.2f}", f"{eager_s / lazy_s:.2f}x"],
        ["loader, 0 workers (reference)", "", f"{loader[0]:.2f}", "1.00x"],
        [f"loader, {workers} workers", "", f"{loader[workers]:.2f}", f"{loader[workers] / loader[0]:.2f}x"],
        [f"model alone, batch {batch} ({amp})", "", f"{model:.2f}", ""],
    ]
    for count in (0, workers):
        result = e2e[count]
        rows.append(
            [
                f"end to end, {count} workers" + (" (reference)" if count == 0 else ""),
                f"{result['seconds']:.2f} s",
                f"{result['rate']:.2f}",
                f"{result['rate'] / e2e[0]['rate']:.2f}x",
            ]
        )
    waits = [
        [
            f"{count} workers",
            f"{e2e[count]['model']:.2f}",
            f"{e2e[count]['wait']:.2f}",
            f"{100 * e2e[count]['steady_wait_share']:.0f}%",
            f"{e2e[count]['median_wait']:.3f}",
            "-" if np.isnan(e2e[count]["gpu_util"]) else f"{e2e[count]['gpu_util']:.0f}%",
        ]
        for count in (0, workers)
    ]
    best = e2e[workers]
    if device.type == "cuda":
        verdict = (
            f"GPU ({device_name}, autocast {amp}): with {workers} workers the model step waited for the loader "
            f"{100 * best['steady_wait_share']:.0f}% of the steady-state time (after the first batch), mean GPU "
            f"utilization {best['gpu_util']:.0f}%: "
            + (
                "the loader keeps the GPU busy."
                if best["steady_wait_share"] < 0.05
                else "the GPU waits on the loader (more workers, or the preprocessing cache, would feed it)."
            )
        )
    else:
        verdict = (
            f"CPU only ({device_name}): the model and the loader workers share {os.cpu_count()} cores, so workers "
            "overlap reading with the model only as far as free cores allow. GPU utilization and the GPU's wait for "
            "the loader are measured when the script runs on a CUDA machine."
        )
    text = (
        f"{arguments.requests} requests over {arguments.series} synthetic series of {arguments.slices} slices of "
        f"{arguments.size}x{arguments.size} int16 CT ({megabytes:.0f} MB each, warm page cache, preprocessing cache "
        f"off) scored with a `{reference.package.config.strategy}` package of the reference architecture "
        f"(input {config.size} at {config.spacing_mm} mm), on {device_name}; batch size {batch}. Preprocessing "
        f"lazy vs eager: best of {arguments.repeat} on one loaded volume, outputs agree to {difference:.1e}. "
        "Loader rates include worker start-up.\n\n"
        f"{markdown_table(['stage', 'time', 'volumes/s', 'vs reference'], rows)}\n\n"
        "Where the end-to-end time went (model step = copy to the device, forward, results back; loader wait = "
        "the model step had no batch; steady-state share excludes the first batch):\n\n"
        f"{markdown_table(WAIT_COLUMNS, waits)}\n\n"
        f"{verdict} One-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after the run on "
        f"{os.cpu_count()} cores: other processes shared the machine, so figures from separate runs can differ by "
        "a factor of two; compare rows of the same run.\n\n"
        "Run `python bench/scoring.py` to refresh (on a GPU machine it measures the GPU)."
    )
    return text


def main() -> None:
    """Parse the arguments, run the benchmark, print the table and write docs/benchmarks.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--series", type=int, default=4, help="distinct series written")
    parser.add_argument("--requests", type=int, default=16, help="requests scored (cycling over the series)")
    parser.add_argument("--slices", type=int, default=160)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds of the lazy/eager preprocessing")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: cores - 1, at most 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the scorer's (8 on CPU, probed on CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--package", type=Path, default=None, help="a model package (default: random weights)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    arguments = parser.parse_args()
    torch.set_num_threads(CPU_THREADS)
    body = run(arguments)
    print(body)
    if not arguments.no_write:
        print(f"written to {write_section('scoring', 'Batch scoring', body)}")


if __name__ == "__main__":
    main()
