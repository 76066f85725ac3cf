"""What test-time adaptation and self-training cost at the competition's size (19 files x 5
severities x 10,000 images = 950,000 images), extrapolated from per-image rates measured here.

    python bench/adaptation_cost.py                         # part1_cpu's model, this machine
    python bench/adaptation_cost.py --preset part3 --images 2048
    python bench/adaptation_cost.py --run models/<run>      # a trained run's model and settings

Measured per image on random uint8 images through the pipeline's own code: plain prediction
(per TTA view), BN adaptation (one extra forward pass), TENT (steps forward+backward passes,
then the BN pass), and a training step (self-training fine-tunes on the training folds plus
the pseudo-labelled images: its cost is images x epochs training steps). The table gives
seconds per 1,000 images and the estimate for 950,000 (self-training: per round, with
--max-images pseudo-labels and a k=5 member's 40,000 labelled CIFAR-100 images; selftrain's
default cap is half of those).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from competition import adapt, augment, models, runtime, selftrain, tta
from competition.config import complete, load_config
from competition.runs import RunDir
from competition.batch_size import step_throughput
from competition.specs import train_spec

LABELLED = 40_000  # a k=5 member's training images of CIFAR-100's 50,000


def per_image(fn, n: int) -> float:
    fn()  # warm-up
    runtime.sync()
    t0 = time.perf_counter()
    fn()
    runtime.sync()
    return (time.perf_counter() - t0) / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="part1_cpu")
    p.add_argument("--run", help="a trained run folder (its model and TTA) instead of a preset")
    p.add_argument("--images", type=int, default=4096, help="images per measurement")
    p.add_argument("--tta", default=None, help="TTA views (default: the preset's oof_tta)")
    p.add_argument("--tent-steps", type=int, default=1)
    p.add_argument("--selftrain-images", type=int, default=int(selftrain.PSEUDO_FRACTION * LABELLED),
                   help="pseudo-labels per round (selftrain --max-images; default: its default for a k=5 member)")
    p.add_argument("--selftrain-epochs", type=int, default=3, help="selftrain --epochs")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        runtime.keep_freed_memory()
    if args.run:
        model, cfg, prep = RunDir(args.run).load_model()
    else:
        cfg = load_config([args.preset])
        model = models.model_from_config({**cfg, "pretrained": False, "weights": None}, 100)
        prep = {"mean": [0.5] * 3, "std": [0.25] * 3, "image_size": cfg["image_size"] or 32,
                "channels_last": cfg["channels_last"], "num_classes": 100}
    model = model.to(dev).eval()
    if prep["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    views = tta.parse_tta(args.tta or cfg.get("oof_tta") or "flip")
    n, bs = args.images, 256
    x8 = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)).to(dev)
    batches = lambda: (augment.to_input(x8[i:i + bs], prep["mean"], prep["std"], prep["image_size"],  # noqa: E731
                                        prep["channels_last"]) for i in range(0, n, bs))
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def plain():
        with torch.no_grad(), amp:
            for i in range(0, n, bs):
                tta.tta_logits(model, x8[i:i + bs], prep, views)

    def bn():
        with adapt.bn_source_stats(model), amp:
            adapt.adapt_bn(model, batches())

    def tent():
        with adapt.source_weights(model), amp:
            adapt.tent(model, lambda: batches(), steps=args.tent_steps, lr=1e-3)

    t_plain, t_bn, t_tent = per_image(plain, n), per_image(bn, n), per_image(tent, n)
    train_ips, _ = step_throughput(train_spec(complete(cfg)).replace(batch_size=256), steps=max(2, n // 256 // 2))
    total = 950_000
    st_images = (LABELLED + args.selftrain_images) * args.selftrain_epochs
    rows = [("predict, TTA " + tta.tta_name(views) + f" ({len(views)} views)", t_plain, t_plain * total),
            ("+ BN adaptation (per file and severity)", t_bn, (t_plain + t_bn) * total),
            (f"+ TENT ({args.tent_steps} step)", t_tent, (t_plain + t_tent) * total),
            (f"self-training round: fine-tune on {st_images:,} images, then predict again",
             1 / train_ips, st_images / train_ips + (t_plain + t_bn) * total)]
    device = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"{args.run or args.preset} ({cfg['model']}), {device}, torch {torch.__version__}\n")
    print("| step | s per 1,000 images | estimate for 950,000 OOD images |\n|---|---:|---:|")
    for name, per, est in rows:
        print(f"| {name} | {per * 1000:.2f} | {est / 60:.1f} min |")


if __name__ == "__main__":
    main()
