"""Every error egp_fx raises on purpose is defined in egp_fx/errors.py and caught by EGPError."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import egp_fx
from egp_fx import errors
from egp_fx.deploy.parity import check_parity
from egp_fx.ir.batches import as_batch


def _modules():
    for info in pkgutil.walk_packages(egp_fx.__path__, "egp_fx."):
        if not info.name.endswith("__main__"):       # the command line: runs on import
            yield importlib.import_module(info.name)


def test_every_error_class_lives_in_errors_py():
    defined_elsewhere = sorted(
        f"{module.__name__}.{name}" for module in _modules()
        for name, cls in vars(module).items()
        if inspect.isclass(cls) and cls.__module__ == module.__name__
        and module.__name__ != "egp_fx.errors"
        and (issubclass(cls, errors.EGPError) or name.endswith("Error")))
    assert defined_elsewhere == []


def test_the_packages_name_the_classes_of_errors_py():
    from egp_fx.deploy import diagnose, parity
    from egp_fx.pruning import PruneError

    assert parity.ParityError is diagnose.ParityError is errors.ParityError
    assert PruneError is egp_fx.PruneError is errors.PruneError
    assert issubclass(errors.ParityError, errors.ExportError)


def _identity_onnx(path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(path))


def test_a_failed_parity_check_is_an_egp_error_with_the_export_exit_code(tmp_path):
    path = tmp_path / "identity.onnx"
    _identity_onnx(path)
    batch = as_batch(torch.ones(2, 3))
    same = check_parity(path, lambda b: [b.args[0]], [batch], ["x"], tolerance=1e-4)
    assert same.max_abs_err == 0.0
    with pytest.raises(egp_fx.EGPError) as caught:
        check_parity(path, lambda b: [b.args[0] + 1.0], [batch], ["x"], tolerance=1e-4)
    assert type(caught.value) is errors.ParityError
    assert errors.exit_code(caught.value) == errors.EXIT_EXPORT
