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


def test_prune_command_trains_with_another_loss(capsys, tmp_path):
    """--loss bce: multi-label 0/1 targets of the model's output shape (no class check), and
    the loss's name in the run log."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 16, 16, generator=g)
    y = (torch.rand(32, 4, generator=g) > 0.5).long()
    torch.save({"x": x, "y": y}, tmp_path / "multi.pt")
    code = cli.main(["prune", "egp_fx.testing.planted:planted_net", "--data", str(tmp_path / "multi.pt"),
                     "--loss", "bce", "--iterations", "1", "--epochs", "1", "--lr", "0.01",
                     "--batch-size", "16", "--no-progress", "--out", str(tmp_path / "run"),
                     "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["final"]["iteration"] == 1
    assert 0 < res["final"]["sparsity"] < 1 and 0 < res["final"]["loss"] < 2
    doc = json.loads((tmp_path / "run" / "log.json").read_text())
    assert doc["loss"] == "bce" and doc["records"][1]["train"][0]["loss"] == res["final"]["loss"]


def test_prune_command_rejects_an_unknown_loss(capsys):
    code = cli.main(["prune", "egp_fx.testing.planted:planted_net", "--data", "digits", "--loss", "hinge"])
    assert code == cli.EXIT_USAGE
    assert "argument --loss: invalid choice: 'hinge'" in capsys.readouterr().err


def tiny_opt():
    """A two-layer OPT with a 64-token vocabulary (a CLI factory: test_prune_cli:tiny_opt)."""
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=32, dropout=0.0, attention_dropout=0.0))


@pytest.mark.slow
def test_prune_command_with_the_lm_loss(capsys, tmp_path):
    """--loss lm: token ids (no labels) train a language model on its own loss; its FFN fc1s
    are pruned."""
    import torch

    pytest.importorskip("transformers")
    ids = torch.randint(2, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids}, tmp_path / "tokens.pt")
    code = cli.main(["prune", "test_prune_cli:tiny_opt", "--data", str(tmp_path / "tokens.pt"),
                     "--loss", "lm", "--iterations", "1", "--epochs", "1", "--lr", "0.01",
                     "--batch-size", "8", "--no-progress", "--out", str(tmp_path / "run"),
                     "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and 3.0 < res["final"]["loss"] < 5.0          # about ln(64) = 4.16
    doc = json.loads((tmp_path / "run" / "log.json").read_text())
    assert doc["prunable_layers"] == [f"model.decoder.layers.{i}.fc1" for i in range(2)]
    assert doc["capture"] == "export" and doc["records"][1]["sparsity"] == pytest.approx(0.5)
