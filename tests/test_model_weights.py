"""Weights in and out: ImageNet backbone files, mmdet checkpoint import (API and CLI), our model file."""

from __future__ import annotations

import pytest
import torch
import torchvision

from jobs import cli
from model import build_detector
from model.backbone import build_backbone
from model.checkpoint import load_model, save_model
from model.config import model_config
from model.mmdet_import import MMDetImportError, convert_state_dict, infer_config, load_mmdet_checkpoint
from tests.mmdet_fixtures import assert_same_detections, fixture_files, load_detector, num_classes
from tests.test_parity_detector import DET_BOX_ATOL, DET_SCORE_ATOL


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
    """A detector fixture's weights wrapped like an mmdet checkpoint file (``meta`` + ``state_dict``), with one
    made-up class name per class of the fixture's config."""
    fx = load_detector(fixture_files("detector_*.pt")[0])
    names = tuple(f"class_{i}" for i in range(num_classes(fx)))
    path = tmp_path_factory.mktemp("mmdet") / "dh.pth"
    torch.save({"meta": {"epoch": 12, "CLASSES": names}, "state_dict": fx["state_dict"]}, path)
    return path, fx, names


def test_infer_config_from_state_dict(mmdet_checkpoint):
    path, fx, names = mmdet_checkpoint
    state, meta = load_mmdet_checkpoint(path)
    cfg = infer_config(state)
    mm = fx["model_config"]
    head = mm["roi_head"]["bbox_head"]
    assert (cfg.backbone.depth, cfg.fpn.out_channels, cfg.num_classes) == (
        mm["backbone"]["depth"],
        mm["neck"]["out_channels"],
        head["num_classes"],
    )
    assert (cfg.roi_head.conv_channels, cfg.roi_head.fc_channels, cfg.roi_head.num_conv_blocks) == (
        head["conv_out_channels"],
        head["fc_out_channels"],
        head["num_convs"],
    )
    assert meta["CLASSES"] == names


def test_import_mmdet_cli_roundtrip(mmdet_checkpoint, tmp_path, capsys):
    path, fx, names = mmdet_checkpoint
    out = tmp_path / "imported.pt"
    assert cli.main(["import-mmdet", str(path), "--out", str(out)]) == 0  # `dhrcnn import-mmdet`, in process
    assert f"ResNet-{fx['model_config']['backbone']['depth']}, {len(names)} classes" in capsys.readouterr().out
    model, _, meta = load_model(out)
    assert meta["class_names"] == list(names)
    model.roi_heads.score_thresh = fx["test_cfg"]["rcnn"]["score_thr"]
    with torch.no_grad():
        dets = model([fx["image_raw"][[2, 1, 0]]])[0]
    assert_same_detections(dets, fx, DET_BOX_ATOL, DET_SCORE_ATOL)


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
