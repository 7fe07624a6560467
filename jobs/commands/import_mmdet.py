"""``dhrcnn import-mmdet CKPT --out FILE``: an mmdet Double-Head checkpoint -> this project's model file."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="mmdet checkpoint (.pth with 'state_dict' and 'meta') or a bare state dict")
    parser.add_argument("--out", required=True, help="output model file (load with model.checkpoint.load_model)")
    parser.add_argument(
        "--classes",
        default=None,
        help="comma-separated class names in mmdet order (default: the checkpoint's meta, if present)",
    )


def run(args: argparse.Namespace) -> int:
    from model.build import build_model
    from model.checkpoint import save_model
    from model.mmdet_import import convert_state_dict, infer_config, load_mmdet_checkpoint

    state, meta = load_mmdet_checkpoint(args.checkpoint)
    cfg = infer_config(state)
    model = build_model(cfg)
    model.load_state_dict(convert_state_dict(state))
    classes = (
        args.classes.split(",")
        if args.classes
        else list(meta.get("CLASSES") or meta.get("dataset_meta", {}).get("classes", []))
    )
    if classes and len(classes) != cfg.num_classes:
        raise SystemExit(f"--classes has {len(classes)} names but the checkpoint has {cfg.num_classes} classes")
    save_model(
        args.out,
        model,
        cfg,
        {"source": str(args.checkpoint), "format_source": "mmdet", "class_names": classes},
    )
    n = sum(p.numel() for p in model.parameters())
    depth, k = cfg.backbone.depth, cfg.num_classes
    print(f"imported {args.checkpoint}: ResNet-{depth}, {k} classes, {n:,} parameters -> {args.out}")
    return 0
