"""The ``tiny`` preset learns: it overfits a handful of synthetic images (loss falls, predicted boxes recover
every ground-truth box at IoU > 0.7 with the right label), with an image without boxes in the batch."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from model import build_criterion, build_model, model_config

COLOURS = torch.tensor([[230, 40, 40], [40, 200, 60], [50, 80, 230]], dtype=torch.uint8)


def synthetic_batch(seed: int = 0):
    """Three 96x128 images with 1-2 flat-coloured rectangles (class = colour) on noise, plus an empty image."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    layouts = [[(10, 12, 60, 70, 0)], [(8, 40, 50, 90, 1), (70, 10, 120, 60, 2)], [(30, 20, 100, 80, 2)]]
    for layout in layouts:
        img = (torch.rand(3, 96, 128, generator=g) * 60 + 90).to(torch.uint8)
        for x1, y1, x2, y2, c in layout:
            img[:, y1:y2, x1:x2] = COLOURS[c][:, None, None]
        images.append(img)
        targets.append(
            {
                "boxes": torch.tensor([b[:4] for b in layout], dtype=torch.float32),
                "labels": torch.tensor([b[4] + 1 for b in layout]),
            }
        )
    images.append(torch.full((3, 80, 112), 120, dtype=torch.uint8))
    targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
    return images, targets


@pytest.mark.slow  # 150 training steps: about 100 s of CPU
@pytest.mark.timeout(900)
def test_tiny_preset_overfits_a_handful_of_images():
    torch.manual_seed(0)
    cfg = model_config("tiny", 3)
    model, criterion = build_model(cfg), build_criterion(cfg)
    images, targets = synthetic_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    history = []
    for it in range(150):
        for group in optimizer.param_groups:
            group["lr"] = 0.01 * min(1.0, (it + 1) / 10)
        losses = criterion(model(images, targets))
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-10:]) / 10 < 0.3 * sum(history[:10]) / 10

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for target, out in zip(targets[:3], outputs[:3], strict=True):
        confident = out["scores"] > 0.5
        iou = box_iou(target["boxes"], out["boxes"][confident])
        best = iou.max(dim=1)
        assert (best.values > 0.7).all(), best.values
        assert torch.equal(out["labels"][confident][best.indices], target["labels"])
    assert (outputs[3]["scores"] > 0.5).sum() == 0
