"""Mistakes in image/mask node params are reported at validation, before anything runs."""
from __future__ import annotations

import pytest

from nodegraph.api import Engine
from tests.imaging import DATA


@pytest.fixture(scope="module")
def engine():
    return Engine()


def workflow(node_type: str, params: dict, inputs: dict | None = None) -> dict:
    return {"format": "nodegraph/1", "nodes": {
        "load": {"type": "LoadImage", "params": {"path": str(DATA / "chelsea_128.png")}},
        "n": {"type": node_type, "inputs": inputs or {"image": "load.image"}, "params": params},
        "save": {"type": "SaveImage", "inputs": {"image": "n.image"}}}}


@pytest.mark.parametrize("node_type,params,field,words", [
    ("ImageResize", {"long_side": 64, "width": 32}, "long_side", "not both"),
    ("ImageResize", {"resample": "cubic", "width": 32}, "resample", "lanczos"),
    ("ExpandCanvas", {"expand_pixels": 512, "max_size": 512}, "expand_pixels", "smaller than max_size"),
    ("ExpandCanvas", {"fill_color": [0, 0, 300]}, "fill_color", "255"),
    ("ExpandCanvas", {"direction": "up"}, "direction", "left"),
])
def test_cross_field_and_bounds_errors(engine, node_type, params, field, words):
    issues = engine.validate(workflow(node_type, params))
    assert len(issues) == 1, issues
    assert issues[0].node_id == "n" and issues[0].field == field and words in str(issues[0])


def test_crop_size_must_suit_the_vae(engine):
    wf = workflow("CropToMask", {"width": 100}, {"image": "load.image", "mask": "load.mask"})
    issues = engine.validate(wf)
    assert [i.field for i in issues] == ["width"] and "multiple of 8" in str(issues[0])


def test_missing_image_file_is_reported_at_validation(engine, tmp_path):
    wf = workflow("ImageResize", {"width": 32})
    wf["nodes"]["load"]["params"]["path"] = str(tmp_path / "gone.png")
    issues = engine.validate(wf)
    assert [i.field for i in issues] == ["path"] and "gone.png" in str(issues[0])


def test_valid_graph_has_no_issues(engine):
    assert engine.validate(workflow("ExpandCanvas", {"expand_pixels": 64, "fill_color": [1, 2, 3]})) == []
