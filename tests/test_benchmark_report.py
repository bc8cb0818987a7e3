"""The benchmark's verdicts (bench/payments.py ``targets``): each target judged, with the CPU arithmetic behind it."""

from __future__ import annotations

import gc
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "payments.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_payments", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _config(peak_ratio: float, load_ms: float | None, client_ms: float | None) -> dict[str, Any]:
    peak: dict[str, Any] = {"rate_per_s": 200.0, "p50_ms": 9.0, "p99_ms": 20.0}
    if load_ms is not None:
        peak["cpu_ms_per_payment"] = {"api": 3.0, "load generator": load_ms}
    unloaded: dict[str, Any] = {"p50_ms": 4.0, "p99_ms": 9.0}
    if client_ms is not None:
        unloaded["cpu_ms_per_payment"] = {"load generator": client_ms}
    return {
        "peak": peak,
        "peak_ratio": peak_ratio,
        "unloaded": unloaded,
        "half_peak": {"p99_ms": 12.0},
        "hot_ratio": 0.1,
    }


def _report(configs: dict[str, Any], cpus: int = 2, reference: float = 2000.0) -> dict[str, Any]:
    return {"machine": {"cpus": cpus}, "reference": {"per_second": reference}, "configs": configs}


def _verdict(verdicts: list[dict[str, Any]], config: str, starts: str) -> dict[str, Any]:
    return next(v for v in verdicts if v["config"] == config and v["target"].startswith(starts))


def test_peak_verdict_states_the_cpu_budget_per_payment_and_what_the_load_generator_used(bench: ModuleType) -> None:
    verdicts = bench.targets(_report({"pg1": _config(0.12, load_ms=1.25, client_ms=0.9)}, cpus=2, reference=2000.0))
    peak = _verdict(verdicts, "pg1", "peak")
    assert peak["met"] is False
    # Two cores at 2,000 payments/s leave 1.00 ms of CPU per payment for everything on the machine.
    assert peak["note"] == "at 1.0× the machine has 1.00 ms of CPU per payment; the load generator alone used 1.25"
    unloaded = _verdict(verdicts, "pg1", "unloaded")
    assert unloaded["note"] == "of which the client's own CPU: 0.90 ms per payment"


def test_verdicts_without_cpu_figures_have_no_note_and_sqlite_has_no_throughput_target(bench: ModuleType) -> None:
    verdicts = bench.targets(
        _report({"sqlite": _config(0.5, load_ms=None, client_ms=None), "pg2": _config(1.1, None, None)})
    )
    assert not any(v["target"].startswith("peak") for v in verdicts if v["config"] == "sqlite")
    peak = _verdict(verdicts, "pg2", "peak")
    assert peak["met"] is True
    assert "note" not in peak
    assert "note" not in _verdict(verdicts, "sqlite", "unloaded")
    assert [v["met"] for v in verdicts if v["target"].startswith("p99")] == [True, True]


def test_the_sdk_cost_script_prints_client_cpu_per_call_for_each_client() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH.parent / "sdk_client.py"), "--calls", "20", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # "  <client>   <median µs>   (<lowest>–<highest>)" per client, after a heading.
    rows = [line.strip().rsplit(None, 2) for line in done.stdout.splitlines()[1:]]
    assert [row[0] for row in rows] == ["SDK sign_transaction", "httpx.AsyncClient alone", "minimal"]
    assert all(float(row[1]) > 0 for row in rows)


def test_a_timed_run_pauses_the_load_generators_collector_and_gives_it_back_even_on_error(bench: ModuleType) -> None:
    seen: dict[str, object] = {}

    def failing_run() -> None:
        with bench.no_collector_pauses():
            seen["enabled"] = gc.isenabled()
            seen["frozen"] = gc.get_freeze_count()  # what existed before the run is out of the way
            raise RuntimeError("a run that failed")

    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        failing_run()
    assert seen["enabled"] is False
    assert isinstance(seen["frozen"], int)
    assert seen["frozen"] > 0
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0  # and collectable again after it
    gc.disable()
    try:
        with bench.no_collector_pauses():
            pass
        assert not gc.isenabled()  # a collector that was off stays off
    finally:
        gc.enable()
