"""The README runs as written: every ```python block executes, in order, on small stand-ins for
the names it leaves to the reader (model, calib_loader, example, ...); every egp_fx name it
mentions exists; egp_fx.prune takes the arguments it documents."""
from __future__ import annotations

import contextlib
import inspect
import io
import re
from pathlib import Path

import pytest
import torch
from spawn_ranks import free_port

import egp_fx
from egp_fx.testing.planted import INPUT_SHAPE, planted_net

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


class SnippetError(AssertionError):
    pass


def _language_model():
    """A tiny OPT whose first FFN has 32 of its 64 units dead (zero weights, bias -1)."""
    import transformers

    torch.manual_seed(0)
    lm = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64)).eval()
    fc1 = lm.model.decoder.layers[0].fc1
    with torch.no_grad():
        fc1.weight[:32] = 0.0
        fc1.bias[:32] = -1.0
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 96, (4, 16), generator=g),
                "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(2)]
    return lm, batches


def stand_ins() -> dict:
    """What the snippets leave to the reader, small: a planted net and its data, a planted
    language model and its token batches."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(8, *INPUT_SHAPE, generator=g) for _ in range(2)]
    labels = [torch.randint(0, 4, (8,), generator=g) for _ in range(2)]
    lm, token_batches = _language_model()
    return {"model": planted_net(), "calib_loader": images, "example": images[0][:1],
            "train_loader": list(zip(images, labels)), "val_loader": list(zip(images, labels)),
            "lm": lm, "token_batches": token_batches}


def run_blocks(blocks: list[str], namespace: dict) -> None:
    """Execute the blocks in order in one namespace, as a reader would; SnippetError names the
    block that raised."""
    for i, code in enumerate(blocks, 1):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:
            raise SnippetError(f"README python block {i} raised {type(err).__name__}: {err}\n"
                               f"{code}") from err


def test_the_readme_has_python_snippets():
    assert BLOCKS and all("egp_fx" in b for b in BLOCKS[:1])


def test_every_readme_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo"}.items():
        monkeypatch.setenv(key, value)               # the snippet of one rank under torchrun
    namespace = stand_ins()
    try:
        run_blocks(BLOCKS, namespace)
    finally:                                         # a snippet that failed left its group
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    written = {p.name for p in tmp_path.iterdir()}
    for name in re.findall(r'"([\w.-]+\.(?:onnx|html|pt2))"', "\n".join(BLOCKS)):
        assert name in written, name            # every file a snippet names was written


def test_a_failing_snippet_fails_the_check():
    with pytest.raises(SnippetError, match="block 2 raised NameError"):
        run_blocks(["x = 1", "print(undefined_name)"], {})


def _resolve(dotted: str):
    obj = egp_fx
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def test_every_egp_fx_name_the_readme_mentions_exists():
    names = set(re.findall(r"(?<![\w/])egp_fx(?:\.\w+)+", README))
    assert "egp_fx.prune" in names and "egp_fx.compress" in names
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except AttributeError:
            missing.append(name)
    assert not missing


def test_prune_takes_the_arguments_the_readme_documents():
    from egp_fx.pruning import FinetuneConfig

    call = re.search(r"`egp_fx\.prune\(([^`]*)\)`", README).group(1)
    keywords = re.findall(r"(\w+)=", call)
    assert keywords[:3] == ["method", "iterations", "finetune"]
    signature = inspect.signature(egp_fx.prune)
    signature.bind(planted_net(), [], **{k: None for k in keywords})
    assert signature == inspect.signature(egp_fx.pruning.egp.prune)
    with pytest.raises(egp_fx.PruneError, match="method must be one of"):
        egp_fx.prune(planted_net(), [], method="nope", finetune=FinetuneConfig(epochs=1))
