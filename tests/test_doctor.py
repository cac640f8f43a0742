"""`sdprep doctor` reports the real environment, and a missing required package fails it."""

from __future__ import annotations

import re

import onnxruntime
import torch

from sdprep import doctor
from sdprep.cli import cli


def test_doctor_reports_this_machine(cli_runner, tmp_path) -> None:
    res = cli_runner.invoke(cli, ["doctor", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert re.search(rf"^  torch +{re.escape(torch.__version__)}$", res.output, re.M)
    assert ", ".join(onnxruntime.get_available_providers()) in res.output
    assert re.search(rf"free disk \({re.escape(str(tmp_path))}\) +\d+\.\d GiB", res.output)
    if not torch.cuda.is_available():
        assert "! gpu" in res.output and "training runs on the CPU" in res.output


def test_a_missing_required_package_fails_with_the_fix(cli_runner, monkeypatch) -> None:
    real = doctor.version
    monkeypatch.setattr(doctor, "version", lambda name: None if name in ("peft", "spandrel") else real(name))
    res = cli_runner.invoke(cli, ["doctor"])
    assert res.exit_code == 1
    assert re.search(r"^x peft +not installed$", res.output, re.M)
    assert "hint: pip install 'sdprep[all]'" in res.output
    assert re.search(
        r"^- spandrel +not installed \(optional: more upscaler architectures\)$", res.output, re.M
    )
