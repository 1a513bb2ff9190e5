"""bench/gpu_check.sh --cpu-smoke: every part of the GPU check, tiny, on this CPU, so the script
that a lent GPU runs once cannot rot between GPU sessions."""
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_part(tmp_path):
    done = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path), "--cpu-smoke"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(result["parts"]) == {"throughput_tiny", "graph_breaks", "quality_bf16", "quality_fp16", "smoke_ddp",
                                    "smoke_fsdp2", "lm_eval"}
    assert all(part["ok"] for part in result["parts"].values())
    assert result["parts"]["graph_breaks"]["graph_breaks"] == 0
    assert result["parts"]["quality_fp16"]["falls"] and result["parts"]["quality_fp16"]["finite"]
