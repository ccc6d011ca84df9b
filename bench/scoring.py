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
[--batch-size B] [--device auto] [--amp auto] [--package DIR|reference] [--no-write]``. On a GPU machine use
enough requests for several batches, e.g. ``--series 8 --requests 512 --batch-size 32``, so that the steady state
is measured.

``--lean`` (what bench/gpu_check.sh runs) skips the preprocessing and loader-alone measurements and, for each
``--amp`` setting given, measures the model alone and end to end twice: preprocessing cache off (every request reads
and preprocesses its series) and warm (every series already preprocessed: a rerun, or a shadow model with the same
preprocessing; ``--cached-requests`` of them, since the loader is then much faster). GPU utilization comes from
``--gpu-log`` (the CSV of ``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used
--format=csv,noheader,nounits -lms 500`` running in the background) when given, else from a sampling thread. The
results go to ``--out DIR`` (scoring-lean.json, rewritten after every run so a cut-off run keeps what it measured,
and scoring-lean.md), never to docs/benchmarks.md; no run starts after ``--deadline-s`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_section
from volume import write_series

from riskbridge.harmonize.features import FeatureSpec, FeatureVector, build_vector, load_default_feature_spec
from riskbridge.model.calibration import Calibrator
from riskbridge.model.data import DEFAULT_PREPROCESS
from riskbridge.model.network import FusionNet, ModelConfig
from riskbridge.model.package import lab_feature_names, reference_package_path, save_package
from riskbridge.model.preprocess import PreprocessConfig, Preprocessor
from riskbridge.model.scoring import AMP_MODES, Scorer, ScoreRequest
from riskbridge.model.volume_io import load_series_volume

WAIT_COLUMNS = ["loader", "model step s", "loader wait s", "steady wait share", "median wait per batch s", "GPU util"]
LEAN_COLUMNS = [
    "autocast",
    "preprocessing cache",
    "requests",
    "batch",
    "end to end volumes/s",
    "model alone volumes/s",
    "wait share",
    "steady wait share",
    "median wait per batch s",
    "GPU util mean",
    "GPU memory MiB",
]
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


def end_to_end(scorer: Scorer, requests: list[ScoreRequest], sample_gpu: bool = True) -> dict[str, float]:
    """Score all requests; return volumes/s, loader wait (all, and after the first batch), and GPU utilization
    (sampled in a thread on CUDA when ``sample_gpu``; NaN otherwise)."""
    sampler = GpuSampler() if scorer.device.type == "cuda" and sample_gpu else None
    start = time.perf_counter()
    if sampler is not None:
        with sampler:
            scorer.score(requests)
    else:
        scorer.score(requests)
    seconds = time.perf_counter() - start
    stats = scorer.last_stats
    waits = stats.batch_waits_s
    result = {
        "seconds": seconds,
        "rate": stats.images / seconds,
        "wait": stats.loader_wait_s,
        "model": stats.model_s,
        "wait_share": stats.wait_share,
        # the first batch waits for worker start-up and the first volumes: unavoidable
        "steady_wait_share": stats.steady_wait_share,
        "median_wait": statistics.median(waits[1:]) if len(waits) > 1 else 0.0,
        "gpu_util": float(np.mean(sampler.samples)) if sampler and sampler.samples else float("nan"),
    }
    return result


def logged_utilization(log: Path, start: float, end: float) -> tuple[float, float, int]:
    """Mean GPU utilization (%), peak memory used (MiB) and the sample count of the ``nvidia-smi`` CSV ``log``
    (timestamp, utilization.gpu, memory.used) between the epoch seconds ``start`` and ``end``; NaN without samples.

    nvidia-smi writes local time, which ``datetime.timestamp`` reads as local time too; unparsable lines (a line
    cut off when the logger stopped, ``[N/A]``) are skipped.
    """
    utilization: list[float] = []
    memory: list[float] = []
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        fields = [field.strip() for field in line.split(",")]
        if len(fields) < 3:
            continue
        try:
            stamp = datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            busy, used = float(fields[1]), float(fields[2])
        except ValueError:
            continue
        if start <= stamp <= end:
            utilization.append(busy)
            memory.append(used)
    if not utilization:
        return float("nan"), float("nan"), 0
    return float(np.mean(utilization)), float(max(memory)), len(utilization)


def lean(arguments: argparse.Namespace) -> dict[str, Any]:
    """Model alone and end to end per ``--amp`` setting, preprocessing cache off and warm; return the results (also
    written to ``--out`` after every run)."""
    spec = load_default_feature_spec()
    workers = arguments.workers if arguments.workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    begun = time.monotonic()
    device_name = "CPU"
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "load_average_before": os.getloadavg()[0],
        },
        "settings": {
            "series": arguments.series,
            "slices": arguments.slices,
            "size": arguments.size,
            "requests": arguments.requests,
            "cached_requests": arguments.cached_requests or arguments.requests,
            "workers": workers,
            "device": arguments.device,
        },
        "runs": [],
        "skipped": [],
    }
    with tempfile.TemporaryDirectory(prefix="riskbridge-bench-scoring-") as temporary:
        root = Path(temporary)
        package = arguments.package or make_package(root / "package", spec)
        series = write_all_series(root, arguments)
        counts = {False: arguments.requests, True: arguments.cached_requests or arguments.requests}
        requests = [
            ScoreRequest(f"p{index}", series[index % len(series)], None, feature_vector(spec, index))
            for index in range(max(counts.values()))
        ]
        for amp in arguments.amp:
            for cached in (False, True):
                label = f"amp {amp}, cache {'warm' if cached else 'off'}"
                if time.monotonic() - begun > arguments.deadline_s:
                    results["skipped"].append(label)
                    print(f"{label}: skipped, past the {arguments.deadline_s:.0f} s deadline", flush=True)
                    continue
                scorer = Scorer.from_package(
                    package,
                    spec,
                    device=arguments.device,
                    batch_size=arguments.batch_size,
                    workers=workers,
                    cache_dir=root / "cache" if cached else None,
                    amp=amp,
                )
                if scorer.device.type == "cuda":
                    device_name = torch.cuda.get_device_name(scorer.device)
                    torch.cuda.reset_peak_memory_stats(scorer.device)
                chosen = requests[: counts[cached]]
                if cached:
                    scorer.score(requests[: len(series)])  # untimed: preprocesses every series into the cache
                model = model_rate(scorer, counts[cached])
                started = time.time()
                measured = end_to_end(scorer, chosen, sample_gpu=arguments.gpu_log is None)
                ended = time.time()
                utilization, memory, samples = measured["gpu_util"], float("nan"), 0
                if arguments.gpu_log is not None:
                    time.sleep(1.0)  # the logger's last samples of the run reach the file
                    utilization, memory, samples = logged_utilization(arguments.gpu_log, started, ended)
                run = {
                    "amp": amp,
                    "autocast": scorer.last_stats.amp,
                    "cache": "warm" if cached else "off",
                    "batch_size": scorer.batch_size,
                    "model_alone_volumes_per_s": model,
                    "end_to_end_volumes_per_s": measured["rate"],
                    "median_wait_per_batch_s": measured["median_wait"],
                    "gpu_util_mean": utilization,
                    "gpu_util_samples": samples,
                    "gpu_memory_used_mib_max": memory,
                    "torch_max_allocated_mib": (
                        torch.cuda.max_memory_allocated(scorer.device) / 2**20 if scorer.device.type == "cuda" else None
                    ),
                    "stats": scorer.last_stats.to_json(),
                }
                results["runs"].append(run)
                results["device_name"] = device_name
                print(
                    f"{label}: {run['end_to_end_volumes_per_s']:.1f} volumes/s end to end, model alone {model:.1f}, "
                    f"wait share {100 * scorer.last_stats.wait_share:.0f}% "
                    f"({100 * scorer.last_stats.steady_wait_share:.0f}% after the first batch), "
                    "GPU util " + ("-" if utilization != utilization else f"{utilization:.0f}%"),
                    flush=True,
                )
                write_lean(arguments.out, results)
        if not arguments.package:
            shutil.rmtree(root / "package", ignore_errors=True)
    results["device_name"] = device_name
    results["machine"]["load_average_after"] = os.getloadavg()[0]
    results["seconds"] = time.monotonic() - begun
    write_lean(arguments.out, results)
    return results


def lean_markdown(results: dict[str, Any]) -> str:
    """The lean results as a markdown paragraph and table (to paste into docs/benchmarks.md)."""
    settings, machine_info = results["settings"], results["machine"]

    def number(value: float | None, digits: int = 1, percent: bool = False, unit: str = "") -> str:
        if value is None or value != value:  # None or NaN: not measured
            return "-"
        return f"{100 * value:.0f}%" if percent else f"{value:.{digits}f}{unit}"

    rows = [
        [
            run["autocast"],
            run["cache"],
            str(run["stats"]["requests"]),
            str(run["batch_size"]),
            number(run["end_to_end_volumes_per_s"]),
            number(run["model_alone_volumes_per_s"]),
            number(run["stats"]["wait_share"], percent=True),
            number(run["stats"]["steady_wait_share"], percent=True),
            number(run["median_wait_per_batch_s"], 3),
            number(run["gpu_util_mean"], 0, unit="%"),
            number(run["gpu_memory_used_mib_max"], 0),
        ]
        for run in results["runs"]
    ]
    text = (
        f"{results.get('device_name', 'CPU')}, torch {machine_info['torch']} (CUDA {machine_info['cuda']}), "
        f"{machine_info['cpus']} CPUs, loader workers: {settings['workers']}; {settings['series']} synthetic series of "
        f"{settings['slices']} slices of {settings['size']}x{settings['size']} int16 CT. Cache off: every request "
        "reads and preprocesses its series; warm: every series already preprocessed. Wait share: the time the model "
        "step waited for the loader over the whole call (steady: after the first batch).\n\n"
        f"{markdown_table(LEAN_COLUMNS, rows)}\n"
    )
    if results["skipped"]:
        text += f"\nSkipped (past the deadline): {', '.join(results['skipped'])}.\n"
    return text


def plain(value: Any) -> Any:
    """``value`` with NaN (not measured) as None, so the results file is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def write_lean(out: Path | None, results: dict[str, Any]) -> None:
    """Write scoring-lean.json and scoring-lean.md into ``out`` (nothing when None)."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "scoring-lean.json").write_text(json.dumps(plain(results), indent=2) + "\n")
    (out / "scoring-lean.md").write_text(lean_markdown(results))


def write_all_series(root: Path, arguments: argparse.Namespace) -> list[Path]:
    """Write ``arguments.series`` synthetic series under ``root`` (seeded by their index), saying each one."""
    series = []
    for index in range(arguments.series):
        series.append(write_series(root / f"series-{index}", arguments.slices, arguments.size, seed=index))
        print(f"series {index + 1}/{arguments.series} written", flush=True)
    return series


def run(arguments: argparse.Namespace) -> str:
    """Run every measurement; return the markdown body of the report section."""
    spec = load_default_feature_spec()
    load_before = os.getloadavg()[0]
    workers = arguments.workers if arguments.workers is not None else max(1, min(8, (os.cpu_count() or 2) - 1))
    with tempfile.TemporaryDirectory(prefix="riskbridge-bench-scoring-") as temporary:
        root = Path(temporary)
        package = arguments.package or make_package(root / "package", spec)
        series = write_all_series(root, arguments)
        requests = [
            ScoreRequest(f"p{index}", series[index % len(series)], None, feature_vector(spec, index))
            for index in range(arguments.requests)
        ]
        scorers = {
            count: Scorer.from_package(
                package,
                spec,
                device=arguments.device,
                batch_size=arguments.batch_size,
                workers=count,
                cache_dir=None,
                amp=arguments.amp[0],
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
    parser.add_argument(
        "--amp",
        nargs="+",
        choices=AMP_MODES,
        default=["auto"],
        help="autocast (auto: on CUDA only); --lean measures each one given, the full run takes one",
    )
    parser.add_argument(
        "--package", default=None, help="a model package directory, or 'reference' (default: random weights)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    parser.add_argument("--lean", action="store_true", help="model alone and end to end per --amp, cache off/warm")
    parser.add_argument("--cached-requests", type=int, default=None, help="--lean, warm cache (default: --requests)")
    parser.add_argument("--out", type=Path, default=None, help="--lean: the folder for scoring-lean.json and .md")
    parser.add_argument("--gpu-log", type=Path, default=None, help="--lean: nvidia-smi's CSV log (see above)")
    parser.add_argument("--deadline-s", type=float, default=float("inf"), help="--lean: start no run after this")
    arguments = parser.parse_args()
    if arguments.package == "reference":
        arguments.package = reference_package_path()
    elif arguments.package is not None:
        arguments.package = Path(arguments.package)
    torch.set_num_threads(CPU_THREADS)
    if arguments.lean:
        print(lean_markdown(lean(arguments)))
        if arguments.out is not None:
            print(f"written to {arguments.out / 'scoring-lean.json'} and scoring-lean.md")
        return
    if len(arguments.amp) > 1:
        parser.error("the full run takes one --amp setting (--lean measures several)")
    body = run(arguments)
    print(body)
    if not arguments.no_write:
        print(f"written to {write_section('scoring', 'Batch scoring', body)}")


if __name__ == "__main__":
    main()
