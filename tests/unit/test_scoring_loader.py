"""Scoring's device-dependent choices and timing: the autocast dtype per device and ``amp`` setting, the loader's
options per device, float32 on the CPU unchanged by the ``amp`` switch, and the wait-share accounting of
:class:`~riskbridge.model.scoring.ScoringStats`.

CUDA is not needed: the per-device choices are pure functions of a ``torch.device`` (and, for bfloat16, of what the
GPU supports, which the tests set); the scorer itself runs on the CPU with the tiny package of test_scoring.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from datetime import datetime
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from test_preprocess import marker_volume, write_series
from test_scoring import SPEC, vector
from tiny_model import tiny_package

from riskbridge.model.preprocess import Preprocessor
from riskbridge.model.scoring import (
    AMP_MODES,
    Scorer,
    ScoreRequest,
    ScoringStats,
    _worker_init,
    autocast_dtype,
    loader_options,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_package(tmp_path_factory.mktemp("package") / "tiny-0.0.1")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    directory = tmp_path_factory.mktemp("staging") / "series"
    hu, _, _ = marker_volume()
    return directory, write_series(directory, hu)


def requests(series: tuple[Path, str], count: int) -> list[ScoreRequest]:
    """``count`` requests, every second one without an image."""
    series_dir, uid = series
    return [ScoreRequest(f"p{i}", series_dir if i % 2 == 0 else None, uid, vector(i)) for i in range(count)]


def test_autocast_is_off_on_the_cpu_unless_asked_for() -> None:
    assert autocast_dtype(CPU) is None
    assert autocast_dtype(CPU, "auto") is None and autocast_dtype(CPU, "off") is None
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast_dtype(CPU, "fp16")
    with pytest.raises(ValueError, match="amp must be one of auto, off, bf16, fp16"):
        autocast_dtype(CPU, "float8")


@pytest.mark.parametrize("bf16", [True, False])
def test_autocast_on_cuda_follows_what_the_gpu_supports(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Old GPU")
    assert autocast_dtype(CUDA) is (torch.bfloat16 if bf16 else torch.float16)
    assert autocast_dtype(CUDA, "off") is None
    assert autocast_dtype(CUDA, "fp16") is torch.float16
    if bf16:
        assert autocast_dtype(CUDA, "bf16") is torch.bfloat16
    else:
        with pytest.raises(ValueError, match="Old GPU does not support bfloat16"):
            autocast_dtype(CUDA, "bf16")
    assert set(AMP_MODES) == {"auto", "off", "bf16", "fp16"}


def test_loader_options_pin_memory_on_cuda_only() -> None:
    assert loader_options(CUDA, 4) == {
        "num_workers": 4,
        "pin_memory": True,
        "worker_init_fn": _worker_init,
        "prefetch_factor": 2,
    }
    assert loader_options(CPU, 0) == {
        "num_workers": 0,
        "pin_memory": False,
        "worker_init_fn": None,
        "prefetch_factor": None,
    }
    assert loader_options(CPU, 3)["pin_memory"] is False and loader_options(CUDA, 0)["pin_memory"] is True


def test_the_cpu_scorers_loader_does_not_pin(package: Path, series: tuple[Path, str]) -> None:
    loader = Scorer.from_package(package, SPEC, device="cpu", workers=2).loader(requests(series, 2))
    assert loader.pin_memory is False and loader.num_workers == 2 and loader.prefetch_factor == 2


def test_amp_off_on_the_cpu_gives_identical_probabilities(package: Path, series: tuple[Path, str]) -> None:
    batch = requests(series, 5)
    default = Scorer.from_package(package, SPEC, device="cpu", batch_size=2)
    off = Scorer.from_package(package, SPEC, device="cpu", batch_size=2, amp="off")
    assert default.amp_dtype is None and off.amp_dtype is None
    first, second = default.score(batch), off.score(batch)
    assert [(r.key, r.probability, r.raw_probability, r.attention) for r in first] == [
        (r.key, r.probability, r.raw_probability, r.attention) for r in second
    ]
    assert default.last_stats.amp == "float32" and default.last_stats.device == "cpu"


def test_bf16_on_the_cpu_is_close_to_float32(package: Path, series: tuple[Path, str]) -> None:
    batch = requests(series, 4)
    exact = Scorer.from_package(package, SPEC, device="cpu").score(batch)
    scorer = Scorer.from_package(package, SPEC, device="cpu", amp="bf16")
    reduced = scorer.score(batch)
    assert scorer.last_stats.amp == "bfloat16"
    for a, b in zip(exact, reduced, strict=True):
        assert a.key == b.key
        assert b.raw_probability == pytest.approx(a.raw_probability, abs=0.02)
        assert sum(b.attention.values()) == pytest.approx(1.0, abs=0.01)  # the softmax ran in bfloat16


def test_a_bad_amp_setting_stops_the_scorer(package: Path) -> None:
    with pytest.raises(ValueError, match="amp must be one of"):
        Scorer.from_package(package, SPEC, device="cpu", amp="on")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Scorer.from_package(package, SPEC, device="cpu", amp="fp16")


def test_wait_share_arithmetic() -> None:
    stats = ScoringStats(batches=3, loader_wait_s=6.0, model_s=3.0, total_s=10.0, batch_waits_s=[4.0, 1.0, 1.0])
    assert stats.wait_share == pytest.approx(0.6)
    assert stats.steady_wait_share == pytest.approx(2.0 / 6.0)  # the first batch's 4 s left out of both sides
    assert stats.other_s == pytest.approx(1.0)
    data = stats.to_json()
    assert data["wait_share"] == pytest.approx(0.6) and data["batch_waits_s"] == [4.0, 1.0, 1.0]
    empty = ScoringStats()
    assert (empty.wait_share, empty.steady_wait_share, empty.volumes_per_s, empty.other_s) == (0.0, 0.0, 0.0, 0.0)


def test_scoring_stats_add_up(package: Path, series: tuple[Path, str]) -> None:
    scorer = Scorer.from_package(package, SPEC, device="cpu", batch_size=2)
    scorer.score(requests(series, 5))
    stats = scorer.last_stats
    assert (stats.requests, stats.images, stats.batches) == (5, 3, 3)
    assert len(stats.batch_waits_s) == 3
    assert stats.loader_wait_s == pytest.approx(sum(stats.batch_waits_s))
    assert stats.loader_wait_s + stats.model_s + stats.other_s == pytest.approx(stats.total_s)
    assert stats.loader_wait_s + stats.model_s <= stats.total_s
    assert 0.0 < stats.wait_share < 1.0 and 0.0 <= stats.steady_wait_share < 1.0
    assert stats.volumes_per_s == pytest.approx(3 / stats.total_s)


def test_a_slow_loader_shows_as_the_models_wait(
    package: Path, series: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = Scorer.from_package(package, SPEC, device="cpu", batch_size=2)
    image = scorer.preprocessor.from_series(*series)

    def slow(self: Preprocessor, series_dir: Path, series_uid: str | None = None) -> np.ndarray:
        time.sleep(0.1)  # a series read from a slow disk
        return image

    monkeypatch.setattr(Preprocessor, "from_series", slow)
    scorer.score(requests(series, 6))  # batches of two requests, one with an image each
    stats = scorer.last_stats
    # the reads count as the model's wait, in every batch, and never as model time
    assert len(stats.batch_waits_s) == 3 and min(stats.batch_waits_s) >= 0.1
    assert stats.wait_share >= 0.3 / stats.total_s and stats.steady_wait_share >= 0.2 / stats.total_s
    assert stats.loader_wait_s + stats.model_s <= stats.total_s


def bench_scoring() -> ModuleType:
    """bench/scoring.py as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[2] / "bench" / "scoring.py"
    spec = importlib.util.spec_from_file_location("bench_scoring", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_utilization_is_read_from_the_nvidia_smi_log_inside_the_runs_window(tmp_path: Path) -> None:
    bench = bench_scoring()
    log = tmp_path / "gpu-util.csv"
    # nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500
    log.write_text(
        "2026/12/07 10:00:00.000, 5, 1000\n"
        "2026/12/07 10:00:00.500, 80, 2000\n"
        "2026/12/07 10:00:01.000, 100, 3000\n"
        "2026/12/07 10:00:01.500, [N/A], [N/A]\n"
        "2026/12/07 10:00:02.000, 0, 500\n"
        "2026/12/07 10:00:02.5"  # cut off when the logger was stopped
    )
    start = datetime(2026, 12, 7, 10, 0, 0, 400000).timestamp()  # local time, as nvidia-smi writes
    end = datetime(2026, 12, 7, 10, 0, 1, 600000).timestamp()
    assert bench.logged_utilization(log, start, end) == (90.0, 3000.0, 2)
    utilization, memory, samples = bench.logged_utilization(tmp_path / "missing.csv", start, end)
    assert samples == 0 and math.isnan(utilization) and math.isnan(memory)


def test_lean_results_are_strict_json_and_a_table(tmp_path: Path) -> None:
    bench = bench_scoring()
    stats = ScoringStats(requests=4, images=4, batches=2, loader_wait_s=1.0, model_s=2.0, total_s=4.0)
    stats.batch_waits_s, stats.device, stats.amp = [0.9, 0.1], "cuda:0", "bfloat16"
    results = {
        "device_name": "NVIDIA H100 80GB HBM3",
        "machine": {"cpus": 16, "python": "3.11.7", "torch": "2.5.1", "cuda": "12.4"},
        "settings": {"series": 8, "slices": 160, "size": 512, "workers": 8},
        "runs": [
            {
                "autocast": "bfloat16",
                "cache": "off",
                "batch_size": 64,
                "model_alone_volumes_per_s": 900.0,
                "end_to_end_volumes_per_s": 20.0,
                "median_wait_per_batch_s": 0.1,
                "gpu_util_mean": float("nan"),
                "gpu_memory_used_mib_max": 1234.0,
                "stats": stats.to_json(),
            }
        ],
        "skipped": ["amp off, cache warm"],
    }
    bench.write_lean(tmp_path, results)
    data = json.loads((tmp_path / "scoring-lean.json").read_text(), parse_constant=pytest.fail)
    assert data["runs"][0]["gpu_util_mean"] is None and data["runs"][0]["stats"]["wait_share"] == 0.25
    table = (tmp_path / "scoring-lean.md").read_text()
    assert table.startswith("NVIDIA H100 80GB HBM3, torch 2.5.1")
    assert "| bfloat16 | off | 4 | 64 | 20.0 | 900.0 | 25% | 3% | 0.100 | - | 1234 |" in table
    assert "Skipped (past the deadline): amp off, cache warm." in table
