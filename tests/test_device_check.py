"""benchmarks/device_check.sh --cpu-smoke: the prepared GPU check runs every section's code on the CPU (CI)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from snakemake_helpers import REPO, child_env

from benchmarks.device_check import SECTIONS

CUDA_ONLY = ("host_syncs", "ddp", "oom")


@pytest.mark.slow
def test_cpu_smoke_writes_every_section_and_exercises_the_cuda_sections_code_on_the_cpu(tmp_path):
    out = tmp_path / "device_check-cpu.json"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--cpu-smoke", "--out", str(out)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    sections = results["sections"]
    assert list(sections) == list(SECTIONS)
    failed = {name: s["error"] for name, s in sections.items() if "error" in s}
    assert not failed, failed
    assert not [name for name, s in sections.items() if str(s.get("skipped", "")).startswith("deadline")]
    assert results["mode"] == "cpu-smoke" and results["total_wall_s"] < 180
    if not torch.cuda.is_available():
        assert all(sections[name]["skipped"] == "no CUDA" for name in CUDA_ONLY)
    # The code behind each section ran and gave sane numbers.
    assert sections["vqvae_training"]["eager"]["loss_finite"] and sections["vqvae_training"]["eager"]["flops_per_step"] > 0
    assert sections["prior_training"]["eager"]["maps_per_s"] > 0
    assert sections["host_syncs"]["cpu_path"]["vqvae"]["host_reads"] == {}  # no host read inside a step
    assert sections["sampling"]["same_seed_same_maps"] and sections["sampling"]["other_seed_other_maps"]
    ddp = sections["ddp"]["cpu_path"]
    assert ddp["loss_finite"] and ddp["collective_calls"]["all_reduce"] > 0 and not ddp["bucket_stride_warning"]
    e2e = sections["end_to_end"]
    resumed = e2e["train_kill_resume"]
    assert resumed["killed"] and resumed["finished"] and resumed["history_steps_unique"]
    assert 0 < resumed["checkpoint_step_at_kill"] < resumed["steps"] == resumed["last_history_step"]
    assert all(rate["slices_per_s"] > 0 for rate in e2e["loader"].values())
    assert e2e["quantize"]["slices"] > 0 and e2e["prior"]["finished"] and e2e["sample"]["images_in_unit_range"]
