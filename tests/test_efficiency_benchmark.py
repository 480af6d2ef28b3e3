"""benchmarks/efficiency.py runs end to end at toy sizes and prints one JSON object (so it cannot rot)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def test_efficiency_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "efficiency.py"), "--sizes", "300,600", "--dim", "16",
           "--batch", "4", "--repeats", "1", "--min_seconds", "0", "--no_encoder", "--t5_size", "tiny",
           "--beam", "3", "--levels", "3", "--codebook", "16", "--gen_repeats", "1", "--query_tokens", "5",
           "--dtype", "bfloat16", "--out_dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sizes"] == [300, 600]
    for key in ("dense_jax_search_qps", "dense_faiss_search_qps", "dense_best_search_qps"):
        assert all(np.isfinite(v) and v > 0 for v in result[key].values())
    assert "crossover_images" in result and (tmp_path / "efficiency.png").stat().st_size > 0
    assert set(result["generative_qps"]) == {"300", "600"}
    assert result["dtype"] == result["generative_model"]["dtype"] == "bfloat16"
