"""Train-step and inference time, FLOPs and parameters: our detector (fc / double / double_ext heads) vs
torchvision's ``fasterrcnn_resnet50_fpn`` with random weights, on the same images, size and proposal counts.

    PYTHONPATH=. python benchmarks/model_step.py                       # 512x672, batch 1, 3 iters (CPU-sized)
    PYTHONPATH=. python benchmarks/model_step.py --image-size 800x1344 --iters 2
    PYTHONPATH=. python benchmarks/model_step.py --device cuda --batch 2 --iters 20 --amp

Per model: one untimed forward (and train step) under ``FlopCounterMode``, ``--warmup`` untimed iterations,
then ``--iters`` timed iterations in interleaved rounds (models in rotating order, so load changes hit all alike);
time = median / ``--batch``, time ratios = median of the per-round ratios. A train step is zero_grad + forward
+ backward + SGD step. ``--clock process`` (CPU only) counts this process's CPU time: steadier on a shared
machine. The last line is ``BENCH_JSON {...}`` for issue notes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from jobs.denormals import flush_denormals
from model import build_criterion, build_model, model_config
from model.outputs import RPNOutputs

HEADS = ("fc", "double", "double_ext")
NOTE = (
    "torchvision model = fasterrcnn_resnet50_fpn as built with an ImageNet backbone (FrozenBatchNorm2d, "
    "trainable_backbone_layers=3: conv1+layer1 frozen), random weights; with weights_backbone=None torchvision "
    "would switch to train-mode BatchNorm2d and all 5 stages trainable. Ours: stem+layer1 frozen (frozen_stages=1), "
    "norm={norm}{norm_note}. Other known differences: torchvision's transform still calls a 1.0x bilinear "
    "interpolate; its RoIAlign is aligned=False/sampling_ratio=2 with box-size level mapping, ours aligned=True/"
    "sampling_ratio=0 (adaptive) with mmdet's finest_scale=56 mapping; its box predictor has a background reg slot."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", default="512x672", help="HxW of every image (default 512x672)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations after the FLOP-counting pass")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", action="store_true", help="bf16 autocast (meant for cuda)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmul/conv on cuda (off by default)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush subnormal floats to zero (as the training workers do, jobs/denormals.py): the slow case",
    )
    p.add_argument("--heads", default="double,double_ext,fc", help="our heads to run (fc always runs)")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--norm", default="bn_eval", choices=("bn_eval", "frozen_bn"), help="our backbone norm")
    p.add_argument(
        "--sampling-ratio", type=int, default=0, help="our RoIAlign samples per bin (0: adaptive; 2: torchvision)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", default="wall", choices=("wall", "process"), help="process: CPU time (CPU only)")
    p.add_argument(
        "--rpn-proposals",
        action="store_true",
        help="feed the RoI heads the random-weight RPN's own proposals (their count then differs per model) "
        "instead of the same 1000 seeded boxes per image",
    )
    args = p.parse_args(argv)
    args.h, args.w = (int(v) for v in args.image_size.lower().split("x"))
    if args.clock == "process" and args.device == "cuda":
        p.error("--clock process measures CPU time; use wall with --device cuda")
    heads = {h.strip() for h in args.heads.split(",") if h.strip()}
    if heads - set(HEADS):
        p.error(f"--heads: unknown {sorted(heads - set(HEADS))}; choose from {','.join(HEADS)}")
    args.heads = [h for h in HEADS if h in heads | {"fc"}]
    return args


def random_boxes(n: int, h: int, w: int, g: torch.Generator, lo: float = 16.0) -> torch.Tensor:
    """``[n, 4]`` xyxy boxes inside the image, sqrt(area) log-uniform in [lo, 0.8·min(h, w)], aspect 1:2..2:1."""
    side = lo * (0.8 * min(h, w) / lo) ** torch.rand(n, generator=g)
    ratio = 2.0 ** (2 * torch.rand(n, generator=g) - 1)
    wh = torch.stack([side / ratio.sqrt(), side * ratio.sqrt()], 1).clamp(max=torch.tensor([w - 1.0, h - 1.0]))
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - wh)
    return torch.cat([xy, xy + wh], 1)


def make_inputs(args: argparse.Namespace, device: torch.device):
    """Seeded uint8 images (ours), the same /255 as float (torchvision), 2-6 random GT boxes each, and
    1000 random proposals per image (what a trained RPN keeps after NMS at 1000 post-NMS top-n)."""
    g = torch.Generator().manual_seed(args.seed)
    images, targets, proposals = [], [], []
    for _ in range(args.batch):
        images.append(torch.randint(0, 256, (3, args.h, args.w), dtype=torch.uint8, generator=g))
        n = int(torch.randint(2, 7, (1,), generator=g))
        labels = torch.randint(1, args.num_classes + 1, (n,), generator=g)
        targets.append({"boxes": random_boxes(n, args.h, args.w, g, 32.0).to(device), "labels": labels.to(device)})
        proposals.append(random_boxes(1000, args.h, args.w, g).to(device))
    images = [im.to(device) for im in images]
    return images, [im.float() / 255 for im in images], targets, proposals


def build_torchvision(args: argparse.Namespace) -> nn.Module:
    """``fasterrcnn_resnet50_fpn``'s own construction path (pretrained-backbone branch) with random weights."""
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    return FasterRCNN(
        _resnet_fpn_extractor(body, 3),
        num_classes=args.num_classes + 1,
        min_size=min(args.h, args.w),  # resize scale = min(min_size/short, max_size/long) = 1.0
        max_size=max(args.h, args.w),
        rpn_pre_nms_top_n_train=2000,
        rpn_post_nms_top_n_train=1000,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_test=1000,
        box_batch_size_per_image=512,
    )


def build_ours(head: str, args: argparse.Namespace) -> tuple[nn.Module, Callable]:
    """Our detector with ``head`` and the criterion that scores its training outputs."""
    preset = "frcnn_r50_fpn" if head == "fc" else "dh_r50_fpn"
    roi_head = {"head": head, "sampling_ratio": args.sampling_ratio}
    cfg = model_config(preset, args.num_classes, roi_head=roi_head, backbone={"norm": args.norm})
    return build_model(cfg), build_criterion(cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def roi_head_flops(model: nn.Module, num_rois: int, device: torch.device) -> int:
    """FLOPs of the box head (+ torchvision's predictor) on ``num_rois`` pooled 256x7x7 RoIs."""
    x = torch.randn(num_rois, 256, 7, 7, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        if isinstance(model, FasterRCNN):
            model.roi_heads.box_predictor(model.roi_heads.box_head(x))
        else:
            model.roi_heads.box_head(x, x)
    return counter.get_total_flops()


class Bench:
    """One model with its optimizer; ``prepare(mode)`` = FLOP pass + warm-up, ``timed(mode)`` = one timed run.

    ``criterion`` turns the model's training output into the loss dict (torchvision's model returns it already).
    """

    def __init__(self, name: str, model: nn.Module, criterion: Callable, images, targets, fixed_props, args, device):
        self.name, self.model, self.criterion, self.images, self.targets, self.args, self.device = (
            name, model.to(device), criterion, images, targets, args, device)  # fmt: skip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=1e-5, momentum=0.9, weight_decay=1e-4)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else nullcontext()
        self.rpn_kept: list[int] = []
        self.times: dict[str, list[float]] = {"train": [], "infer": []}
        self.stats: dict[str, float] = {"train_mem_gib": 0.0, "infer_mem_gib": 0.0}

        def rpn_hook(_m, _i, out):  # ours returns RPNOutputs, torchvision's (proposals, losses)
            ours = isinstance(out, RPNOutputs)
            self.rpn_kept.extend(len(b) for b in (out.proposals if ours else out[0]))
            if args.rpn_proposals:
                return out
            fixed = [p.clone() for p in fixed_props]
            return replace(out, proposals=fixed) if ours else (fixed, out[1])

        model.rpn.register_forward_hook(rpn_hook)

    def run(self, mode: str):
        if mode == "infer":
            with torch.inference_mode(), self.amp:
                return self.model(self.images)
        self.opt.zero_grad(set_to_none=True)
        with self.amp:
            losses = self.criterion(self.model(self.images, self.targets))
        sum(losses.values()).backward()
        self.opt.step()
        return None

    def prepare(self, mode: str) -> None:
        self.model.train(mode == "train")
        self.rpn_kept.clear()
        with FlopCounterMode(display=False) as counter:
            out = self.run(mode)
        self.stats[f"{mode}_gflops"] = counter.get_total_flops() / self.args.batch / 1e9
        if mode == "infer":
            self.stats["rpn_kept"] = sum(self.rpn_kept) / len(self.rpn_kept)
            self.stats["dets"] = sum(len(d["boxes"]) for d in out) / self.args.batch
        for _ in range(self.args.warmup):
            self.run(mode)

    def timed(self, mode: str) -> None:
        cuda = self.device.type == "cuda"
        if cuda:  # peak of this step (grads included) + this model's resident params and optimizer state
            self.opt.zero_grad(set_to_none=True)
            sync(self.device)
            base = torch.cuda.memory_allocated(self.device)
            own = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
            own += sum(v.numel() * v.element_size() for st in self.opt.state.values() for v in st.values())
            torch.cuda.reset_peak_memory_stats(self.device)
        clock = time.perf_counter if self.args.clock == "wall" else time.process_time
        t0 = clock()
        self.run(mode)
        sync(self.device)
        self.times[mode].append(clock() - t0)
        if cuda:
            peak = (torch.cuda.max_memory_allocated(self.device) - base + own) / 2**30
            self.stats[f"{mode}_mem_gib"] = max(self.stats[f"{mode}_mem_gib"], peak)

    def row(self) -> dict:
        m, b = self.model, self.args.batch
        head = [m.roi_heads.box_head] + ([m.roi_heads.box_predictor] if m.roi_heads.box_predictor is not None else [])
        row = {
            "model": self.name,
            "train_s": statistics.median(self.times["train"]) / b,
            "infer_s": statistics.median(self.times["infer"]) / b,
            **self.stats,
            "head_gflops_1000": roi_head_flops(m, 1000, self.device) / 1e9,
            "params_m": sum(p.numel() for p in m.parameters()) / 1e6,
            "trainable_m": sum(p.numel() for p in self.params) / 1e6,
            "head_params_m": sum(p.numel() for h in head for p in h.parameters()) / 1e6,
        }
        if self.device.type != "cuda":
            row["train_mem_gib"] = row["infer_mem_gib"] = None
        return row


def print_table(rows: list[dict], cuda: bool) -> None:
    cols = {"train_s": 3, "infer_s": 3, "train_gflops": 1, "infer_gflops": 1, "head_gflops_1000": 1, "params_m": 2}
    cols |= {"trainable_m": 2, "head_params_m": 2, "rpn_kept": 0, "dets": 0}
    cols |= {"train_mem_gib": 2, "infer_mem_gib": 2} if cuda else {}
    print(f"{'model':<12} " + " ".join(f"{c:>{max(len(c), 8)}}" for c in cols))
    for r in rows:
        print(f"{r['model']:<12} " + " ".join(f"{r[c]:>{max(len(c), 8)}.{d}f}" for c, d in cols.items()))
    print(
        "(times: s/img, median; GFLOPs/img (train = fwd+bwd); head = box head (+ predictor) on 1000 RoIs; "
        "rpn_kept = the random RPN's own test proposals/img; dets = detections/img)"
    )


def ratio_lines(rows: dict[str, dict], times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    pairs = [("fc", "torchvision")] + [(h, "fc") for h in ("double", "double_ext") if h in rows]
    out = {}
    for a, b in pairs:
        q = {k: rows[a][k] / rows[b][k] for k in ("train_gflops", "infer_gflops", "params_m")}
        for m in ("train", "infer"):  # paired per-round ratios: robust to load drifting between rounds
            q[f"{m}_s"] = statistics.median(x / y for x, y in zip(times[a][m], times[b][m], strict=True))
        out[f"{a}/{b}"] = q
        print(
            f"{a + ' / ' + b:<22} train time {q['train_s']:.3f}x (FLOPs {q['train_gflops']:.3f}x)   "
            f"infer time {q['infer_s']:.3f}x (FLOPs {q['infer_gflops']:.3f}x)   params {q['params_m']:.3f}x"
        )
    fc = out["fc/torchvision"]
    worst = max(fc["train_s"], fc["infer_s"])
    print(f"goal ours-fc <= 1.05x torchvision: {'PASS' if worst <= 1.05 else 'FAIL'} (worst {worst:.3f}x)")
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if not args.keep_denormals:
        flush_denormals()  # before the intra-op threads start (jobs/denormals.py)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    images, float_images, targets, fixed_props = make_inputs(args, device)
    env = (
        f"torch {torch.__version__}, device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"threads {torch.get_num_threads()}, denormals {'kept' if args.keep_denormals else 'flushed'}, "
        f"image {args.h}x{args.w}, batch {args.batch}, iters {args.iters} "
        f"(+{args.warmup} warm-up + 1 FLOP pass), amp {args.amp}, tf32 {args.tf32 and device.type == 'cuda'}, "
        f"clock {args.clock}, K={args.num_classes}, RPN pre/post NMS train 2000/1000 test 1000/1000, "
        f"RoI heads fed {'the RPN output' if args.rpn_proposals else 'the same 1000 random boxes/img'}, "
        "512 sampled RoIs/img in training"
    )
    print(env, flush=True)
    benches = []
    for name in ["torchvision", *args.heads]:
        torch.manual_seed(args.seed)
        model, criterion = (build_torchvision(args), dict) if name == "torchvision" else build_ours(name, args)
        ims = float_images if name == "torchvision" else images
        benches.append(Bench(name, model, criterion, ims, targets, fixed_props, args, device))
    for mode in ("train", "infer"):  # interleaved rounds, rotating order: load changes hit every model alike
        for b in benches:
            b.prepare(mode)
        for i in range(args.iters):
            for b in benches[i % len(benches) :] + benches[: i % len(benches)]:
                b.timed(mode)
            print(f"  {mode} round {i + 1}/{args.iters}: " + ", ".join(
                f"{b.name} {b.times[mode][-1] / args.batch:.3f}" for b in benches), flush=True)  # fmt: skip
        for b in benches:
            b.opt.zero_grad(set_to_none=True)
    rows = {b.name: b.row() for b in benches}
    print()
    print_table(list(rows.values()), device.type == "cuda")
    print()
    ratios = ratio_lines(rows, {b.name: b.times for b in benches})
    norm_note = " (BN affine of layer2-4 trainable)" if args.norm == "bn_eval" else ""
    print("note:", NOTE.format(norm=args.norm, norm_note=norm_note))
    summary = {"env": env, "results": rows, "ratios": ratios}
    print("BENCH_JSON " + json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
