"""What test-time adaptation and self-training cost at the competition's size (19 files x 5
severities x 10,000 images = 950,000 images), extrapolated from per-image rates measured here.

    python bench/adaptation_cost.py                         # part1_cpu's model, this machine
    python bench/adaptation_cost.py --preset part3 --images 2048
    python bench/adaptation_cost.py --run models/<run>      # a trained run's model and settings

Measured per image on random uint8 images through the pipeline's own code: plain prediction
(per TTA view), BN adaptation (one extra forward pass), the label-free guards of a learned slice
(BN's reference statistics and labels, and the adapted model's own labels: three passes), every
learned objective (adapt.OBJECTIVES: steps forward+backward passes, then the BN pass) under every
choice of which parameters learn (adapt.PARAMS; "all" also computes the convolutions' weight
gradients) and with ROID's weight ensembling, and a training step (self-training fine-tunes on
the training folds plus the pseudo-labelled images: its cost is images x epochs training steps).
The table gives seconds per 1,000 images of the step itself, the estimate for 950,000 of
predicting with it (a learned row: predict + learning + guards, as predict runs it), and that
estimate relative to predicting with BN adaptation (self-training: per round, with --max-images
pseudo-labels and a k=5 member's 40,000 labelled CIFAR-100 images; selftrain's default cap is
half of those).
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
    p.add_argument("--tent-steps", "--learn-steps", type=int, default=1, dest="tent_steps",
                   help="learned adaptation: passes over each slice (predict --learn-steps)")
    p.add_argument("--learn-ensemble", type=float, default=0.99, metavar="ALPHA",
                   help="the weight-ensembling rows' alpha (predict --learn-ensemble)")
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

    def guards():  # predict_learned's: BN statistics and labels for reference, then the adapted model's labels
        with adapt.bn_source_stats(model), amp, torch.no_grad():
            adapt.adapt_bn(model, batches())
            for _ in range(2):
                for x in batches():
                    model(x).argmax(1)

    def learned(objective, params, alpha):
        def run():
            with adapt.source_weights(model), amp:
                adapt.learn(model, lambda: batches(), objective, args.tent_steps, 1e-3, params, alpha)
        return run

    t_plain, t_bn, t_guards = per_image(plain, n), per_image(bn, n), per_image(guards, n)
    variants = [(o, ps, None) for o in adapt.OBJECTIVES for ps in adapt.PARAMS] + [
        (o, "bn", args.learn_ensemble) for o in adapt.OBJECTIVES]
    t_learned = {v: per_image(learned(*v), n) for v in variants}
    train_ips, _ = step_throughput(train_spec(complete(cfg)).replace(batch_size=256), steps=max(2, n // 256 // 2))
    total = 950_000
    st_images = (LABELLED + args.selftrain_images) * args.selftrain_epochs
    rows = [("predict, TTA " + tta.tta_name(views) + f" ({len(views)} views)", t_plain, t_plain * total),
            ("+ BN adaptation (per file and severity)", t_bn, (t_plain + t_bn) * total),
            ("(a learned slice's guards: BN reference and labels, its own labels)", t_guards, None)]
    rows += [(f"+ {adapt.variant(*v)} ({args.tent_steps} step{'s' * (args.tent_steps > 1)}, params {v[1]}"
              f"{f', ensemble {v[2]:g}' if v[2] is not None else ''}; with guards)", t,
              (t_plain + t + t_guards) * total) for v, t in t_learned.items()]
    rows += [(f"self-training round: fine-tune on {st_images:,} images, then predict again",
              1 / train_ips, st_images / train_ips + (t_plain + t_bn) * total)]
    device = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"{args.run or args.preset} ({cfg['model']}), {device}, torch {torch.__version__}, {n} images\n")
    print("| step | s per 1,000 images | estimate for 950,000 OOD images | vs predict + BN |\n|---|---:|---:|---:|")
    bn_total = (t_plain + t_bn) * total
    for name, per, est in rows:
        print(f"| {name} | {per * 1000:.2f} | " + (f"{est / 60:.1f} min | {est / bn_total:.2f}x |" if est else "| |"))


if __name__ == "__main__":
    main()
