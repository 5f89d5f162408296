"""`egp-fx prune` passes the IMP scope, the augmentation and the re-init ablation on to prune()."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from egp_fx.cli import app as cli

DIGITS = pytest.mark.skipif(
    not (Path(__file__).resolve().parents[1] / "egp_fx" / "data" / "digits.npz").is_file(),
    reason="egp_fx/data/digits.npz is not shipped in this checkout")
FACTORY = "egp_fx.testing.planted:planted_net"


@DIGITS
def test_prune_command_options(capsys, tmp_path):
    code = cli.main(["prune", FACTORY, "--num-classes", "10", "--data", "digits",
                     "--method", "imp", "--imp-scope", "prunable", "--augment", "shift",
                     "--reinit-ablation", "--reinit-epochs", "1", "--iterations", "1", "--epochs", "1",
                     "--num-batches", "1", "--batch-size", "16", "--no-progress", "--out",
                     str(tmp_path), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["final"]["method"] == "imp"
    assert res["final"]["reinit"]["method"] == "imp-reinit"
    doc = json.loads((tmp_path / "log.json").read_text())
    assert doc["imp_scope"] == "prunable" and doc["pruned_layers"] == doc["prunable_layers"]
    assert "fc" not in doc["pruned_layers"]
    assert doc["augment"] == {"pad": 2, "flip": False, "fill": None, "seed": 0}
    assert len(doc["reinit"]["train"]) == 1 and (tmp_path / "reinit.safetensors").exists()


def test_prune_command_rejects_an_unknown_scope(capsys):
    code = cli.main(["prune", FACTORY, "--data", "digits", "--imp-scope", "some"])
    assert code == cli.EXIT_USAGE
    assert "argument --imp-scope: invalid choice: 'some'" in capsys.readouterr().err
