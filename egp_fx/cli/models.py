"""Model loading for the egp-fx command line: a name or a factory, plus optional weights.

A model is named as
- a torchvision model name (`resnet50`, `swin_t`), built with weights=None;
- a timm model name (`swin_tiny_patch4_window7_224`), built with pretrained=False;
- `package.module:factory`, a callable returning an nn.Module (imported from the Python path).
`source` picks between torchvision and timm when a name exists in both (auto: torchvision first).

Weights come from `--checkpoint`: a .safetensors file, or a torch file read with
torch.load(weights_only=True) -- plain tensors only, never arbitrary pickled objects. A state
dict wrapped as {"state_dict": ...} / {"model": ...} and a "module." prefix (DataParallel) are
accepted. A checkpoint that does not fit the architecture is refused with the missing,
unexpected and mis-shaped keys named.
"""
from __future__ import annotations

import difflib
import importlib
import pickle
from pathlib import Path

import torch
from torch import nn

from egp_fx.errors import ModelLoadError

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net", "weights")
_OPTIONAL_KEYS = ("num_batches_tracked",)   # BN counters: older checkpoints lack them
_SHOW = 8


def _torchvision_names() -> list[str]:
    import torchvision
    return list(torchvision.models.list_models())


def _timm_names() -> list[str]:
    try:
        import timm
    except ImportError:
        return []
    return list(timm.list_models())


def _suggest(name: str) -> str:
    candidates = sorted(set(_torchvision_names()) | set(_timm_names()))
    close = difflib.get_close_matches(name, candidates, n=6, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (f"unknown model {name!r}: not a torchvision or timm model name.{hint} "
            "Name a torchvision/timm model, or a factory as package.module:function.")


def _from_factory(spec: str, kwargs: dict) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"model {spec!r}: write a factory as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelLoadError(f"model {spec!r}: cannot import module {module_name!r} ({err}); "
                             "is it on PYTHONPATH?") from err
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        close = difflib.get_close_matches(attr, names, n=5, cutoff=0.5)
        raise ModelLoadError(f"model {spec!r}: module {module_name!r} has no callable {attr!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        model = factory(**kwargs)
    except Exception as err:  # user code: report whatever it raised
        raise ModelLoadError(f"model {spec!r}: {attr}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                             f"raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model {spec!r}: {attr}() returned a {type(model).__name__}, "
                             "not a torch.nn.Module")
    return model


def build_model(spec: str, *, source: str = "auto", num_classes: int | None = None) -> nn.Module:
    """Build the named model with random weights (see the module docstring for the forms)."""
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    if ":" in spec:
        return _from_factory(spec, kwargs)
    try:
        if source in ("auto", "torchvision") and spec in _torchvision_names():
            import torchvision
            return torchvision.models.get_model(spec, weights=None, **kwargs)
        if source in ("auto", "timm") and spec in set(_timm_names()):
            import timm
            return timm.create_model(spec, pretrained=False, **kwargs)
    except Exception as err:  # constructor rejected the arguments
        raise ModelLoadError(f"model {spec!r} could not be built with {kwargs}: "
                             f"{type(err).__name__}: {err}") from err
    raise ModelLoadError(_suggest(spec))


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a .safetensors or torch file (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelLoadError(
            f"checkpoint {str(path)!r} holds Python objects other than tensors, which egp-fx does "
            f"not unpickle (torch.load weights_only=True said: {str(err).splitlines()[0]}). "
            "Save the weights alone: torch.save(model.state_dict(), path), or use safetensors."
        ) from err
    except Exception as err:  # corrupt or foreign file
        raise ModelLoadError(f"checkpoint {str(path)!r} cannot be read: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}") from err
    return _unwrap(state, path)


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict):
        for key in _WRAPPERS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a "
                             "state dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelLoadError(f"checkpoint {str(path)!r}: entries {bad[:_SHOW]} are not tensors; "
                             "expected a state dict (name -> tensor)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _listing(title: str, items: list[str]) -> str:
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{title} ({len(items)}): {', '.join(items[:_SHOW])}{more}"


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load the checkpoint into `model`, or raise ModelLoadError naming every mismatch."""
    state = read_checkpoint(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_KEYS)]
    unexpected = [k for k in state if k not in expected]
    shaped = [f"{k} {list(state[k].shape)} vs model {list(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shaped:
        parts = [_listing(t, items) for t, items in (("missing keys", missing),
                 ("unexpected keys", unexpected), ("mis-shaped keys", shaped)) if items]
        hint = (" If only the classifier differs, pass --num-classes."
                if shaped and not missing and not unexpected else
                " Is it a checkpoint of this architecture?")
        raise ModelLoadError(f"checkpoint {str(path)!r} does not fit {type(model).__name__}: "
                             + "; ".join(parts) + "." + hint)
    model.load_state_dict(state, strict=False)


def load_model(spec: str, *, checkpoint: str | Path | None = None, source: str = "auto",
               num_classes: int | None = None) -> nn.Module:
    """Build the model, load the checkpoint if given, and put it in eval mode."""
    model = build_model(spec, source=source, num_classes=num_classes)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def default_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """(C, H, W) the model expects: a timm model's pretrained config, 3x224x224 for torchvision
    classification models; None when unknown (a factory model)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size:
        return tuple(int(s) for s in size)
    if type(model).__module__.startswith("torchvision.models."):
        return (3, 224, 224)
    return None
