"""Each tiny twin of the component recipes trains a few steps on the demo data, then its export loads and encodes.

All twins run in one subprocess (``mmembed.train``'s ``main`` per recipe) to pay the torch/DeepSpeed start-up once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.train.conftest import ROOT, train_overrides

TWINS = ["pool_adapter", "visual_table", "late_fusion", "multi_encoder", "aim", "latent_attention", "multi_layer"]

_SCRIPT = """
import json, sys
import mmembed
from mmembed.train.__main__ import main
out, overrides = sys.argv[1], json.loads(sys.argv[2])
for name, extra in overrides.items():
    rc = main([f"recipes/tiny/{name}.yaml", *extra])
    emb = mmembed.load(f"{out}/{name}/final").encode(texts=["a red circle", None], images=[None, sys.argv[3]])
    print("RESULT", json.dumps({"name": name, "rc": rc, "shape": list(emb.shape), "finite": bool((emb == emb).all())}))
"""


def test_every_tiny_twin_trains_and_its_export_loads(demo_data, tmp_path, torch_extensions_dir):
    image = next((demo_data / "eval").rglob("*.png"), None) or next(demo_data.rglob("*.png"))
    overrides = {
        name: train_overrides(demo_data, tmp_path / name, **{"train.max_steps": 2, "train.log_every": 1})
        for name in TWINS
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": torch_extensions_dir}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path), json.dumps(overrides), str(image)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["name"]: r for r in (json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT "))}
    assert sorted(results) == sorted(TWINS), proc.stderr[-3000:]
    for name, r in results.items():
        assert r["rc"] == 0 and r["finite"] and r["shape"][0] == 2, (name, r)
        losses = [json.loads(line).get("loss") for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses = [x for x in losses if x is not None]
        assert losses and all(math.isfinite(x) for x in losses), (name, losses)
    assert results["late_fusion"]["shape"][1] == 32  # embed_dim of the twin
