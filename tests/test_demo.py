"""The demo's pipeline on the reduced setting: shipped checkpoint -> compress -> accuracy -> ONNX -> bench -> HTML."""
from __future__ import annotations

import json

from egp_fx.cli import app as cli
from egp_fx.cli.demo import main


def test_demo_quick_through_the_command_line(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(0 of 360 predictions differ)" in out
    assert "conv/linear depth                 18" in out            # the pruned model before
    for name in ("original.onnx", "compressed.onnx", "report.html", "bench.json"):
        assert (tmp_path / name).stat().st_size > 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["original", "original (torch.onnx.export default)",
                                          "compressed"]
    assert all(r["median_ms"] > 0 for r in rows)
    assert "that of the original as torch.onnx.export writes it by default" in out
    depth = {r["model"]: r["layers_on_longest_path"] for r in rows}
    assert depth["compressed"] < depth["original"] == 18


def test_demo_without_its_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("egp_fx.cli.demo.DEMO_CHECKPOINT", tmp_path / "missing.safetensors")
    assert main(["--out", str(tmp_path)]) == 2
    assert "demo checkpoint" in capsys.readouterr().err
