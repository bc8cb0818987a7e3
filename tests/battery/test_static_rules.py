"""Static security checks: bandit and the local semgrep rules find nothing in the service and fire on bad code.

scripts/check runs both before the tests and fails on any finding. Here the same tools, with the
same configuration, run once over the service (custody/, policies/) and the samples in
static_samples/: the service must be clean, and every sample line marked ``# flags: ID`` must be
reported with that id, and no other sample line. So a rule that stops matching, or a configuration
that stops being read, fails this test rather than passing CI silently.

semgrep runs with local rules only and metrics off; where the machine allows it (as root in CI),
it runs in a network namespace with no network at all, which proves it needs none.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = Path(__file__).parent / "static_samples"
TOOLS = Path(sys.executable).parent
SERVICE = ("custody", "policies")


_MARK = re.compile(r"# flags: ([A-Za-z0-9_-]+)$")


def _flagged(path: Path) -> set[tuple[int, str]]:
    """(line, id) for every line of a sample that ends in ``# flags: ID``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return {(n, mark[1]) for n, line in enumerate(lines, 1) if (mark := _MARK.search(line))}


@functools.cache
def _offline_prefix() -> tuple[str, ...]:
    """``unshare --net`` where this process may create a network namespace, else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True, check=False)
    return (unshare, "--net") if probe.returncode == 0 else ()


def _run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "SEMGREP_ENABLE_VERSION_CHECK": "0", "SEMGREP_SEND_METRICS": "off"}
    return subprocess.run(
        [*_offline_prefix(), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _relative(filename: str) -> str:
    return str((ROOT / filename).resolve().relative_to(ROOT))


def test_semgrep_rules_flag_every_bad_sample_and_nothing_in_the_service(tmp_path: Path) -> None:
    sample = SAMPLES / "semgrep_sample.py"
    done = _run(
        str(TOOLS / "semgrep"),
        "scan",
        "--config",
        ".semgrep",
        "--metrics=off",
        "--disable-version-check",
        "--json",
        "--quiet",
        str(sample.relative_to(ROOT)),
        *SERVICE,
        home=tmp_path,
    )
    assert done.returncode in (0, 1), done.stderr  # 1: findings (in the sample)
    report = json.loads(done.stdout)
    assert report["errors"] == []
    found: dict[str, set[tuple[int, str]]] = {}
    for result in report["results"]:
        rule = result["check_id"].rsplit(".", 1)[-1]
        found.setdefault(_relative(result["path"]), set()).add((result["start"]["line"], rule))
    in_service = {path: hits for path, hits in found.items() if path.startswith(SERVICE)}
    assert in_service == {}
    assert found[str(sample.relative_to(ROOT))] == _flagged(sample)
    # Every rule in .semgrep/ is shown to fire.
    rules = {rule["id"] for f in (ROOT / ".semgrep").glob("*.yaml") for rule in yaml.safe_load(f.read_text())["rules"]}
    assert rules == {rule for _, rule in _flagged(sample)}
    assert len(rules) >= 3


def test_bandit_with_the_project_config_flags_every_bad_sample_and_nothing_in_the_service(tmp_path: Path) -> None:
    sample = SAMPLES / "bandit_sample.py"
    done = _run(
        str(TOOLS / "bandit"),
        "-c",
        "pyproject.toml",
        "-r",
        "-q",
        "-f",
        "json",
        str(sample.relative_to(ROOT)),
        *SERVICE,
        home=tmp_path,
    )
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    assert report["errors"] == []
    found: dict[str, set[tuple[int, str]]] = {}
    for result in report["results"]:
        found.setdefault(_relative(result["filename"]), set()).add((result["line_number"], result["test_id"]))
    in_service = {path: hits for path, hits in found.items() if path.startswith(SERVICE)}
    assert in_service == {}
    # The sample's assert is not reported: the configuration (which skips only B101) was read.
    assert found[str(sample.relative_to(ROOT))] == _flagged(sample)
    assert report["metrics"]["_totals"]["loc"] > 10_000  # the service was scanned, not skipped
