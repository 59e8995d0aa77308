"""``scripts/gpu_check.py`` keeps what it measured when a step fails, hangs or leaves something
unreadable: fake steps (tiny Python commands) stand in for the GPU's."""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_hanging_or_unreadable_step_loses_nothing_measured(gpu_check, monkeypatch, tmp_path):
    report = tmp_path / "out" / "gpu_check.json"
    work = tmp_path / "work"
    work.mkdir()

    def fake_steps(self_test: bool, work_dir: Path, junit: Path) -> list:
        Step = gpu_check.Step
        return [
            Step("environment", python("print('versions'); print('not JSON')"), 30),
            Step("tests", python("print('ran')"), 30, junit),  # leaves no JUnit XML
            # What the report on disk holds while this step runs: the steps before it.
            Step("parity", python(f"import json; print(sorted(json.load(open({str(report)!r}))['steps']))"), 30),
            Step("kernels", python(f"open({str(work / 'k.json')!r}, 'w').write('{{cut')"), 30, work / "k.json"),
            Step("e2e", python("import time; print('started', flush=True); time.sleep(60)"), 1, work / "e2e.json"),
        ]

    monkeypatch.setattr(gpu_check, "steps", fake_steps)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # pytest's own SIGTERM handling stays
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--self-test", "--json", str(report)])
    assert gpu_check.main() == 1
    data = json.loads(report.read_text())
    steps = data["steps"]
    assert data["finished"] and not data["ok"] and list(steps) == ["environment", "tests", "parity", "kernels", "e2e"]
    assert "JSONDecodeError" in steps["environment"]["result_error"] and not steps["environment"]["ok"]
    assert steps["tests"]["ok"] and "result" not in steps["tests"]
    assert steps["parity"]["output_tail"].strip() == "['environment', 'tests']"  # written after every step
    assert "JSONDecodeError" in steps["kernels"]["result_error"]
    assert steps["e2e"]["timed_out"] and steps["e2e"]["output_tail"] == "started\n"
    logs = {p.name for p in report.parent.iterdir()}
    assert logs == {"gpu_check.json", *(f"gpu_check_{name}.log" for name in steps)}
    assert (report.parent / "gpu_check_e2e.log").read_text() == "started\n"  # the whole output, as it ran


def test_failed_tests_keep_their_message_and_the_end_of_their_traceback(gpu_check, tmp_path):
    junit = tmp_path / "tests.xml"
    traceback = "x" * 5000 + "\nE   AssertionError: 3 != 4"
    junit.write_text(f"""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite tests="3" failures="1" errors="1"
        skipped="0"><testcase classname="tests.test_ops_triton" name="test_ok"/>
        <testcase classname="tests.test_ops_triton" name="test_decode"><failure message="{"m" * 900}">{traceback}</failure>
        </testcase><testcase classname="tests.test_ops_api" name="test_plan"><error message="boom">setup</error>
        </testcase></testsuite></testsuites>""")
    counts = gpu_check.junit_counts(junit)
    assert (counts["passed"], counts["failures"], counts["errors"]) == (1, 1, 1)
    decode, plan = counts["failure_details"]
    assert decode["test"] == "tests.test_ops_triton::test_decode" and decode["kind"] == "failure"
    assert decode["message"] == "m" * gpu_check.MESSAGE
    assert len(decode["details"]) == gpu_check.DETAILS and decode["details"].endswith("AssertionError: 3 != 4")
    assert plan == {"test": "tests.test_ops_api::test_plan", "kind": "error", "message": "boom", "details": "setup"}


def test_wheels_that_do_not_unpack_are_recorded_and_the_check_goes_on(gpu_check, monkeypatch, tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    monkeypatch.setattr(gpu_check, "WHEELS", wheels)
    names, error = gpu_check.unpack_wheels(tmp_path)
    assert names == ["broken-1.0-py3-none-any.whl"] and error.startswith("pip exited")
