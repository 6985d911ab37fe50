"""Peak memory and time of one HRDA / MIC(HRDA) training iteration at the paper size, against DAFormer.

    python benchmarks/hrda_memory.py                                  # CPU, fp32, all three variants
    python benchmarks/hrda_memory.py --variants hrda --amp bf16 --device cuda

The iteration is assembled from udaseg's modules in the official order (hrda.md §1.0, mic.md §1.0),
since HRDA is not yet a preset of the training step:

1. EMA teacher update;
2. source step: the student's forward on 2 source crops, the segmentation loss (HRDA: 0.9 fused +
   0.1 detail on a random 512² detail crop of the 1024² context crop), plus the thing-class feature
   distance on the context features against a frozen copy of the initial network; backward;
3. teacher pseudo-labels on 2 target crops (HRDA: fused prediction with overlapping 512² sliding
   detail windows, 9 per crop, all in one batch);
4. ClassMix + colour jitter + blur; mixed step; backward;
5. (MIC) colour-augmented, 64 px block-masked target crops (32 px at DAFormer size); masked step; backward;
6. one AdamW step (its state is allocated before the measured iteration).

Networks: MiT-B5 with the DAFormer head (``daformer_mitb5``: 512² crops; ``hrda_daformer_mitb5``:
1024² context crops). Random weights and synthetic images (memory and time do not depend on them).
Each variant runs in its own process; peak memory is the process's peak RSS on a CPU and the peak
allocated CUDA memory on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

VARIANTS = {
    # name: (model, crop, mask block or 0)
    "daformer": ("daformer_mitb5", 512, 0),
    "mic_daformer": ("daformer_mitb5", 512, 32),
    "hrda": ("hrda_daformer_mitb5", 1024, 0),
    "mic_hrda": ("hrda_daformer_mitb5", 1024, 64),
}
SMALL = {"daformer_mitb5": "daformer_tiny", "hrda_daformer_mitb5": "hrda_daformer_tiny"}  # --small: a smoke run


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _segmentation_loss(out, labels, weight=None):
    from udaseg.methods.base import segmentation_cross_entropy
    from udaseg.methods.hrda import hrda_segmentation_loss
    from udaseg.models.hrda import HRDAOutput

    if isinstance(out, HRDAOutput):
        return sum(hrda_segmentation_loss(out, labels, weight).values())
    return segmentation_cross_entropy(out.logits, labels, weight)


def measure(variant: str, device_name: str, amp: str, small: bool = False) -> dict:
    from udaseg.adapt.augment import strong_augment
    from udaseg.adapt.masking import mask_images
    from udaseg.adapt.mixing import class_mix_masks, mix
    from udaseg.adapt.pseudo_label import confidence_ratio, pseudo_labels, pseudo_weight_map
    from udaseg.adapt.teacher import EMATeacher
    from udaseg.config.schema import IMAGENET_MEAN, IMAGENET_STD, OptimConfig
    from udaseg.engine.optim import build_optimizer
    from udaseg.methods.daformer import feature_distance, thing_class_mask
    from udaseg.models import build_model

    model_name, size, block = VARIANTS[variant]
    options = {}
    if small:
        model_name, size, block = SMALL[model_name], size // 8, block // 8
        options = {"detail_crop_size": [size // 2, size // 2]} if model_name.startswith("hrda") else {}
    device = torch.device(device_name)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model(model_name, 19, **options).to(device).train()
    imagenet = copy.deepcopy(model).eval()
    for p in imagenet.parameters():
        p.requires_grad_(False)
    teacher = EMATeacher(model)
    optimizer = build_optimizer(model, OptimConfig())
    for p in model.parameters():  # allocate AdamW's moments before the measured iteration
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    baseline = _peak_mib(device)

    source = torch.randn(2, 3, size, size, generator=gen).to(device)
    blocks = torch.randint(0, 19, (2, 1, max(size // 64, 1), max(size // 64, 1)), generator=gen).float()
    labels = torch.nn.functional.interpolate(blocks, size=(size, size), mode="nearest")[:, 0].long().to(device)
    target = torch.randn(2, 3, size, size, generator=gen).to(device)

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    teacher.update(1)
    with autocast:
        out = model(source, taps=("enc_last",))
        loss = _segmentation_loss(out, labels)
        student_features = out.features["enc_last"].float()
        with torch.no_grad():
            imnet_features = imagenet(source, taps=("enc_last",), decode=False).features["enc_last"].float()
    mask = thing_class_mask(labels, student_features.shape[-2:], [6, 7, 11, 12, 13, 14, 15, 16, 17, 18], 19, 0.75)
    (loss + 0.005 * feature_distance(student_features, imnet_features, mask)).backward()
    del out, loss, student_features, imnet_features

    with autocast:
        teacher_logits = teacher(target).logits.float()
    pseudo = pseudo_labels(teacher_logits, (size, size))
    weight = pseudo_weight_map(confidence_ratio(pseudo.confidence), pseudo.labels.shape, device=device)
    masks = class_mix_masks(labels, gen)
    mixed = strong_augment(mix(masks, source, target), IMAGENET_MEAN, IMAGENET_STD, True, True, generator=gen)
    with autocast:
        out = model(mixed)
        loss = _segmentation_loss(out, mix(masks, labels, pseudo.labels), mix(masks, torch.ones_like(weight), weight))
    loss.backward()
    del out, loss

    if block:
        masked, _ = mask_images(strong_augment(target, IMAGENET_MEAN, IMAGENET_STD, True, True, generator=gen),
                                block, 0.7, gen)
        with autocast:
            out = model(masked)
            loss = _segmentation_loss(out, pseudo.labels, weight)
        loss.backward()
        del out, loss
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"variant": variant, "seconds": seconds, "peak_mib": _peak_mib(device), "before_iteration_mib": baseline}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["daformer", "hrda", "mic_hrda"], choices=sorted(VARIANTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--small", action="store_true", help="tiny networks at 1/8 of the sizes (a smoke run)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        variant, device, amp, small = args.child
        print(json.dumps(measure(variant, device, amp, small == "small")))
        return 0
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available()
               else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores")
    print(f"# {machine}, torch {torch.__version__}, amp {args.amp}, threads {torch.get_num_threads()}", flush=True)
    for variant in args.variants:
        argv = [sys.executable, __file__] + (["--threads", str(args.threads)] if args.threads else [])
        child = ["--child", variant, args.device, args.amp, "small" if args.small else "paper"]
        done = subprocess.run(argv + child, capture_output=True, text=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            print(json.dumps({"variant": variant, "error": tail}), flush=True)
            continue
        print(done.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
