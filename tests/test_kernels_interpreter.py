"""The Triton kernels on the CPU: the `interpreter` tests, in a pytest process of their own.

Triton decides at import whether @triton.jit kernels are compiled or interpreted, so the
tests of the interpreted kernels cannot share a process with the others. This test runs the
ones that this run collected (all of tests/ when it collected none, e.g. this file alone) in
`TRITON_INTERPRET=1 python -m pytest -m interpreter`, and passes when every one of them does.
To run them by hand: TRITON_INTERPRET=1 python -m pytest -m interpreter -q tests/
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from conftest import INTERPRETER_TESTS


def test_interpreter_tests_pass_in_their_own_process(request, tmp_path):
    pytest.importorskip("triton")  # without Triton there is no interpreter: the ops run PyTorch only
    config = request.config
    selected = config.stash.get(INTERPRETER_TESTS, []) or [str(config.rootpath / "tests")]
    junit = tmp_path / "interpreter.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "interpreter", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *selected]  # fmt: skip
    profile = config.getoption("hypothesis_profile", None)
    if profile:
        command.append(f"--hypothesis-profile={profile}")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(command, cwd=config.rootpath, env=env, capture_output=True, text=True)
    output = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, f"the interpreter tests failed (exit {run.returncode}):\n{output}"
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    ran = int(suite.get("tests")) - int(suite.get("skipped"))
    assert ran > 0 and int(suite.get("failures")) == int(suite.get("errors")) == 0, output
    if config.stash.get(INTERPRETER_TESTS, []):
        # Every test this run left to the sub-run was collected there (parametrized ids included).
        assert int(suite.get("tests")) == len(selected), f"{suite.get('tests')} of {len(selected)} collected:\n{output}"
