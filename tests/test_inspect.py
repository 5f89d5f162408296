"""egp_fx.inspect: decision table, graph diff, graph export, pictures and HTML report.

Two kinds of input: the planted network run through compress (egp_fx/testing/planted.py: what is
dead or linear is known for every input), and a hand-made compression (a calibrated graph with
nodes removed by hand and a CompressReport written by hand), which pins the inspect logic
independently of the passes.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
import torch

from egp_fx.calibrate.calibration import calibrate
from egp_fx.capture import trace
from egp_fx.inspect import inspect
from egp_fx.inspect.blocks import BlockNamer
from egp_fx.inspect.graph import load_graph
from egp_fx.inspect.html import bench_rows
from egp_fx.inspect.picture import fate
from egp_fx.passes.base import Decision, DecisionKind, Refusal, Rewrite, Status
from egp_fx.passes.reasons import Reason, Why
from egp_fx.pipeline.compress import compress
from egp_fx.pipeline.measures import measure, nonlinear_depth, weighted_depth
from egp_fx.pipeline.report import (
    ORIGINAL_META_KEY,
    REPORT_META_KEY,
    CompressReport,
    Transient,
    original_of,
    report_of,
)
from egp_fx.testing.planted import BLOCK_DEAD, STEM_DEAD, WIDTH, planted_net


def _batches(n=3, size=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, size, size, generator=gen) for _ in range(n)]


@pytest.fixture(scope="module")
def planted():
    data = _batches()
    gm = compress(planted_net(), data, channel_multiple=1, progress=False)
    return gm, inspect(gm, example_input=data[0], title="planted")


# ----------------------------------------------------------------------------- decision table

def test_table_has_one_row_per_activation_call_with_planted_statistics(planted):
    _, ins = planted
    rows = ins.table.by_node()
    assert list(rows) == ["stem_2", "layer1_0_relu1", "layer1_0_relu2", "layer2_0_relu"]
    assert rows["stem_2"].dead_channels == STEM_DEAD
    assert rows["layer1_0_relu1"].dead_channels == BLOCK_DEAD
    assert (rows["layer2_0_relu"].linear, rows["layer2_0_relu"].dead) == (WIDTH, 0)
    assert rows["layer2_0_relu"].egp_entropy == 0.0
    assert all(r.channels == WIDTH and r.kind == "relu" for r in ins.table)
    assert [r.block for r in ins.table] == ["stem", "layer1.0", "layer1.0", "layer2"]


def test_table_decisions_agree_with_the_report(planted):
    gm, ins = planted
    decisions = report_of(gm).decisions()
    rows = ins.table.by_node()
    assert decisions, "the planted net must give compress something to decide"
    for node, decision in decisions.items():
        row = rows[node]
        if decision.kind is DecisionKind.KEPT:
            assert (row.decision, row.category) == ("kept", "kept")
            assert decision.why in row.reason
        else:
            assert row.decision == str(decision)
            assert row.category == decision.kind.value
    assert rows["layer1_0_relu1"].decision == f"narrowed {WIDTH} -> {WIDTH - len(BLOCK_DEAD)}"
    assert rows["layer2_0_relu"].category == "linearised"
    assert rows["layer1_0_relu2"].reason == "every channel is nonlinear on the calibration data"


def test_table_renders_as_text_json_and_html(planted):
    _, ins = planted
    text = str(ins.table)
    assert text.splitlines()[0].split()[:3] == ["activation", "module", "kind"]
    assert ins.table.by_node()["layer1_0_relu1"].path == "layer1.0.relu1"
    assert len(text.splitlines()) == 2 + len(ins.table)
    data = json.loads(ins.table.to_json())
    assert [d["node"] for d in data] == [r.node for r in ins.table]
    assert ins.table.to_html().count('<tr class="d-') == len(ins.table)


# ----------------------------------------------------------------------------- graph diff

def test_diff_matches_the_two_graphs(planted):
    gm, ins = planted
    before = {n.name for n in original_of(gm).graph.nodes}
    after = {n.name for n in gm.graph.nodes}
    assert set(ins.diff.removed) | set(ins.diff.folded) == before - after
    assert set(ins.diff.added) == after - before
    assert set(ins.diff.modified) <= before & after


def test_diff_agrees_with_the_report(planted):
    gm, ins = planted
    report = report_of(gm)
    gone = set(ins.diff.removed) | set(ins.diff.folded)
    after = {n.name for n in gm.graph.nodes}
    for rw in report.applied:
        assert {n for n in rw.nodes if n not in after} <= gone
    changes = {c.name: c for c in ins.diff.changes}
    for rw in report.applied:
        if rw.kind == "fold_bn":
            bn, conv = rw.key, next(n for n in rw.nodes if n != rw.key)
            assert (changes[bn].change, changes[bn].into) == ("folded", conv)
    assert changes["layer2_0_relu"].change == "removed"
    assert "linearise" in changes["layer2_0_relu"].by
    assert changes["layer1_0_conv1"].change == "modified"
    assert "weight [8, 8, 3, 3] -> [7, 8, 3, 3]" in changes["layer1_0_conv1"].detail
    assert "weight [8, 8, 3, 3] -> [8, 7, 3, 3]" in changes["layer1_0_conv2"].detail


def test_diff_block_totals_add_up_to_the_report_totals(planted):
    gm, ins = planted
    report = report_of(gm)
    assert ins.diff.totals() == {"params_before": report.before.params,
                                 "params_after": report.after.params,
                                 "flops_before": report.before.flops,
                                 "flops_after": report.after.flops}
    block = {b.block: b for b in ins.diff.blocks}["layer1.0"]
    assert (block.weighted_before, block.weighted_after) == (2, 2)
    assert block.flops_after < block.flops_before


# ----------------------------------------------------------------------------- graph

def test_graph_depths_match_the_report_and_measures(planted):
    gm, ins = planted
    report = report_of(gm)
    depths = ins.depths()
    assert depths["before"] == {"weighted_depth": report.before.weighted_depth,
                                "nonlinear_depth": report.before.nonlinear_depth}
    assert depths["after"] == {"weighted_depth": report.after.weighted_depth,
                               "nonlinear_depth": report.after.nonlinear_depth}
    assert depths["after"]["nonlinear_depth"] == nonlinear_depth(gm)
    assert depths["after"]["weighted_depth"] == weighted_depth(gm)


@pytest.mark.parametrize("suffix", [".graphml", ".json"])
def test_graph_saves_and_loads_with_its_annotations(planted, tmp_path, suffix):
    _, ins = planted
    path = ins.save_graph(tmp_path / f"g{suffix}")
    g = load_graph(path)
    assert set(g.nodes) == set(ins.graph.nodes)
    assert g.number_of_edges() == ins.graph.number_of_edges()
    assert g.nodes["stem_1"]["status"] == "folded"
    assert g.nodes["layer1_0_relu1"]["decision"] == "narrowed 8 -> 7"
    assert g.nodes["layer1_0_relu1"]["dead"] == 1
    assert g.nodes["stem_0"]["role"] == "conv" and g.nodes["stem_0"]["shape"] == "1x8x16x16"


# ----------------------------------------------------------------------------- hand-made input

def _hand_made():
    """Calibrate the planted net, drop layer2's ReLU and BN by hand, add a scale node, and say
    so in a hand-written report (with a refusal and a rolled-back rewrite)."""
    data = _batches(2)
    original = calibrate(planted_net(), data, progress=False)
    gm = copy.deepcopy(original)
    nodes = {n.name: n for n in gm.graph.nodes}
    relu, bn, conv = nodes["layer2_0_relu"], nodes["layer2_0_bn"], nodes["layer2_0_conv"]
    relu.replace_all_uses_with(bn)
    gm.graph.erase_node(relu)
    with gm.graph.inserting_after(bn):
        scale = gm.graph.call_function(torch.mul, (bn, 1.0))
    bn.replace_all_uses_with(scale)
    scale.args = (bn, 1.0)
    gm.graph.lint()
    gm.recompile()
    x = data[0]
    report = CompressReport(before=measure(original, x), after=measure(gm, x), tolerance=1e-5)
    report.rewrites = [
        Rewrite("linear_units", "linearise", "layer2_0_relu", ["layer2_0_relu"], True,
                "layer2_0_relu (relu) -> identity", activation="layer2_0_relu",
                decision=Decision(DecisionKind.LINEARISED)),
        Rewrite("dead_channels", "narrow_channels", "layer1_0_relu1",
                ["layer1_0_conv1", "layer1_0_relu1", "layer1_0_conv2"], True, "narrow",
                activation="layer1_0_relu1", decision=Decision(DecisionKind.NARROWED, before=8, after=7),
                error=3e-3, status=Status.ROLLED_BACK),
    ]
    report.refusals = [
        Refusal("dead_channels", "stem_2", ["stem_2"], Why(Reason.DC_FEEDS, {
            "node": "add", "op": "call_function", "target": "add"}), activation="stem_2"),
        Refusal("dead_channels", "layer1_0_relu1", ["layer1_0_relu1"], Why(Reason.ROLLED_BACK, {
            "verdict": Why(Reason.BEYOND_TOLERANCE, {"error": 3e-3, "bound": 1e-5})}),
            activation="layer1_0_relu1"),
    ]
    gm.meta[REPORT_META_KEY] = report
    gm.meta[ORIGINAL_META_KEY] = Transient(original)
    return gm, x, conv.name


def test_hand_made_compression_is_described_exactly():
    gm, x, _ = _hand_made()
    ins = inspect(gm, example_input=x)
    rows = ins.table.by_node()
    assert (rows["layer2_0_relu"].decision, rows["layer2_0_relu"].category) == ("linearised", "linearised")
    assert (rows["stem_2"].decision, rows["stem_2"].reason) == (
        "kept", "dead channels kept: feeds add (call_function add)")
    assert rows["layer1_0_relu1"].decision == "kept"
    assert rows["layer1_0_relu1"].reason == "rolled back: output error 0.003 beyond tolerance 1e-05"
    assert any("rolled back" in h for h in rows["layer1_0_relu1"].history)
    assert ins.diff.removed == ["layer2_0_relu"]
    assert ins.diff.added == ["mul"]
    assert ins.diff.folded == [] and ins.diff.modified == []
    assert {c.name: c.by for c in ins.diff.changes}["layer2_0_relu"] == "linear_units/linearise layer2_0_relu"
    assert ins.graph_after.nodes["mul"]["status"] == "added"
    assert ins.graph_after.nodes["mul"]["block"] == "layer2"   # inherited from its input
    assert ins.depths()["after"]["nonlinear_depth"] == ins.depths()["before"]["nonlinear_depth"] - 1


def test_inspect_refuses_a_module_that_compress_did_not_return():
    gm = calibrate(planted_net(), _batches(1), progress=False)
    with pytest.raises(KeyError, match="compress"):
        inspect(gm)


# ----------------------------------------------------------------------------- blocks

@pytest.mark.parametrize("name, expected", [
    ("resnet18", {"conv1", "layer1.0", "layer1.1", "layer2.0", "layer4.1", "fc"}),
    ("mobilenet_v2", {"features.0", "features.3", "features.18", "classifier"}),
])
def test_blocks_of_torchvision_models(name, expected):
    import torchvision
    gm = trace(torchvision.models.get_model(name))
    blocks = set(BlockNamer(gm).blocks(gm).values())
    assert expected <= blocks
    assert not any(b.endswith(("downsample", "downsample.0", ".conv1")) for b in blocks)


def test_blocks_of_timm_swin_follow_stages_and_blocks():
    from timm.models.swin_transformer import SwinTransformer
    swin = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16,
                           depths=(2, 3), num_heads=(1, 2), num_classes=3)   # swin-T, shrunk
    gm = trace(swin)
    blocks = BlockNamer(gm).blocks(gm)
    assert blocks["layers_1_blocks_0_mlp_fc1"] == "layers.1.blocks.0"
    assert blocks["layers_1_downsample_reduction"] == "layers.1.downsample"
    assert {b for b in blocks.values() if b.startswith("layers.1.blocks.")} == {
        "layers.1.blocks.0", "layers.1.blocks.1", "layers.1.blocks.2"}


# ----------------------------------------------------------------------------- pictures, HTML

@pytest.mark.parametrize("attrs, expected", [
    ({"status": "kept", "category": ""}, "kept"),
    ({"status": "folded", "category": ""}, "folded"),
    ({"status": "removed", "category": "linearised"}, "linearised"),
    ({"status": "removed", "category": ""}, "removed"),
    ({"status": "kept", "category": "narrowed"}, "narrowed"),
    ({"status": "modified", "category": "", "change": "weight [8, 3] -> [7, 3]"}, "narrowed"),
    ({"status": "modified", "category": "", "change": "weights changed"}, "absorbed"),
    ({"status": "added", "category": ""}, "added"),
])
def test_picture_fate_of_a_node(attrs, expected):
    assert fate(attrs) == expected


def test_pictures_are_written_as_valid_svg_and_png(planted, tmp_path):
    from PIL import Image
    _, ins = planted
    paths = ins.write_pictures(tmp_path)
    assert sorted(p.name for p in paths) == ["before_after.png", "before_after.svg",
                                             "entropy.png", "entropy.svg"]
    svg = ET.parse(tmp_path / "before_after.svg").getroot()
    text = "".join(svg.itertext())
    assert "layer1.0" in text and "before (original graph)" in text
    with Image.open(tmp_path / "before_after.png") as img:
        assert img.size[0] > 600 and img.size[1] > 150


def test_bench_rows_accepts_markdown_json_and_objects():
    md = "| model | median ms |\n| --- | ---: |\n| original | 2.0 |\n| compressed | 1.5 |"
    assert bench_rows(md) == [{"model": "original", "median ms": "2.0"},
                              {"model": "compressed", "median ms": "1.5"}]
    assert bench_rows(json.dumps({"rows": [{"model": "a", "median_ms": 1.0}]})) == [
        {"model": "a", "median_ms": 1.0}]

    class Fake:
        def to_dict(self):
            return {"rows": [{"model": "b", "median_ms": 2.0}], "environment": {}}
    assert bench_rows(Fake()) == [{"model": "b", "median_ms": 2.0}]
    assert bench_rows(None) is None


def test_html_report_is_self_contained_and_complete(planted):
    _, ins = planted
    ins.bench = "| model | median ms |\n| --- | ---: |\n| original | 2.0 |\n| compressed | 1.5 |"
    try:
        page = ins.html()
    finally:
        ins.bench = None
    for forbidden in ("http:", "https:", "<script", "<link", "src=", "@import"):
        assert forbidden not in page
    assert re.findall(r"url\((?!#)", page) == []        # only references inside the page
    assert page.count("<svg") == 2
    for row in ins.table:
        assert f"<td>{row.node}</td>" in page
    for heading in ("Summary", "Per-layer decisions", "Graph diff by block", "Benchmark"):
        assert f"<h2>{heading}</h2>" in page
    assert "<td>narrowed 8 -&gt; 7</td>" in page
    assert "<td>compressed</td>" in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed "
                    "(apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(planted, tmp_path):
    from PIL import Image, ImageStat
    _, ins = planted
    page = ins.write_html(tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
           "--hide-scrollbars", f"--screenshot={shot}", page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    with Image.open(shot) as img:
        assert img.size == (1200, 1600)
        assert max(ImageStat.Stat(img.convert("L")).stddev) > 20      # not a blank page
    dom = subprocess.run([*cmd[:-2], "--dump-dom", page.resolve().as_uri()], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert "Per-layer decisions" in dom and dom.count("<svg") == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "swin_tiny_patch4_window7_224"])
def test_large_model_pictures_stay_one_row_per_block(name, tmp_path):
    import timm
    import torchvision
    model = torchvision.models.resnet50() if name == "resnet50" else timm.create_model(name)
    size = 64 if name == "resnet50" else 224
    data = [torch.randn(2, 3, size, size)]
    gm = compress(model.eval(), data, channel_multiple=1, progress=False)
    ins = inspect(gm, example_input=data[0])
    fig = ins.figures()["before_after"]
    width, height = fig.get_size_inches()
    assert height < 9 and width < 16
    ins.write_html(tmp_path / "r.html")
