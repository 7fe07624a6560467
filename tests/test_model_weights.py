"""Weights in and out: ImageNet backbone files, mmdet checkpoint import (API and CLI), our model file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision

from model import build_detector
from model.backbone import build_backbone
from model.checkpoint import load_model, save_model
from model.config import model_config
from model.mmdet_import import MMDetImportError, convert_state_dict, infer_config, load_mmdet_checkpoint
from tests.mmdet_fixtures import REPO, fixture_files, load


def test_imagenet_backbone_weights_from_local_file(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone(depth=18, fpn_channels=64, weights=str(path))
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(backbone.body.state_dict()[key], value), key


def test_missing_backbone_weights_name_the_file(tmp_path):
    missing = tmp_path / "resnet50-0676ba61.pth"
    with pytest.raises(FileNotFoundError, match=r"resnet50-0676ba61\.pth.*Nothing is downloaded"):
        build_detector("dh_r50_fpn", 80, backbone={"weights": str(missing)})


def test_backbone_weights_of_wrong_depth(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="do not fit a ResNet of this depth"):
        build_backbone(depth=50, weights=str(path))


@pytest.fixture(scope="module")
def mmdet_checkpoint(tmp_path_factory):
    """The r18 fixture's weights wrapped like an mmdet checkpoint file (``meta`` + ``state_dict``)."""
    fx = load(fixture_files("detector_*.pt")[0])
    path = tmp_path_factory.mktemp("mmdet") / "dh_r18.pth"
    torch.save({"meta": {"epoch": 12, "CLASSES": ("a", "b", "c")}, "state_dict": fx["state_dict"]}, path)
    return path, fx


def test_infer_config_from_state_dict(mmdet_checkpoint):
    path, _ = mmdet_checkpoint
    state, meta = load_mmdet_checkpoint(path)
    cfg = infer_config(state)
    assert (cfg.backbone.depth, cfg.fpn.out_channels, cfg.num_classes) == (18, 64, 3)
    assert (cfg.roi_head.conv_channels, cfg.roi_head.fc_channels, cfg.roi_head.num_conv_blocks) == (128, 256, 4)
    assert meta["CLASSES"] == ("a", "b", "c")


def test_import_mmdet_cli_roundtrip(mmdet_checkpoint, tmp_path):
    path, fx = mmdet_checkpoint
    out = tmp_path / "imported.pt"
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "import-mmdet", str(path), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "ResNet-18, 3 classes" in result.stdout
    model, _, meta = load_model(out)
    assert meta["class_names"] == ["a", "b", "c"]
    model.roi_heads.score_thresh = 0.0  # the fixture's test_cfg
    with torch.no_grad():
        dets = model([fx["image_raw"][[2, 1, 0]]])[0]
    torch.testing.assert_close(dets["scores"], fx["det_scores"], rtol=0, atol=1e-5)


def test_import_rejects_foreign_checkpoints(tmp_path):
    with pytest.raises(MMDetImportError, match=r"roi_head\.bbox_head"):
        convert_state_dict({"backbone.conv1.weight": torch.zeros(1)})
    with pytest.raises(MMDetImportError, match=r"unexpected key 'head\.fc\.weight'"):
        convert_state_dict({"roi_head.bbox_head.fc_cls.weight": torch.zeros(2, 2), "head.fc.weight": torch.zeros(1)})
    bad = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": {"obj": object.__new__(_Opaque)}}, bad)
    with pytest.raises(MMDetImportError, match="weights_only=True"):
        load_mmdet_checkpoint(bad)


class _Opaque:
    """A class the weights-only unpickler must refuse."""


def test_model_file_roundtrip(tmp_path):
    torch.manual_seed(0)
    cfg = model_config("tiny", 2, roi_head={"head": "double_ext"})
    model = build_detector("tiny", 2, roi_head={"head": "double_ext"}).eval()
    path = tmp_path / "m.pt"
    save_model(path, model, cfg, {"class_names": ["x", "y"]})
    loaded, cfg2, meta = load_model(path)
    assert cfg2 == cfg and meta == {"class_names": ["x", "y"]}
    img = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        a, b = model([img])[0], loaded([img])[0]
    torch.testing.assert_close(a["boxes"], b["boxes"])
