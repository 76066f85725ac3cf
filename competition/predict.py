"""Stage 3: test-time-augmented logits of trained runs, for the ensemble and the submission.

    python -m competition.predict models/part1-demo-f0-s0 --ood-dir data/ood-test
    python -m competition.predict 'models/part3-*' --ood-dir data/ood-test --tta shift1 --bn-adapt
    python -m competition.predict models/part2-demo-f0-s0 --ood-dir data/ood-local/digits-n40 --tta none
    accelerate launch -m competition.predict models/part3-f0-s0 --ood-dir data/ood-test   # every GPU

For each run folder (its best.pt and saved configs) it writes, under models/<run>/pred/<setting>/
(one folder per setting: the TTA, '-prob' for probability averaging, '+bn' for BN adaptation,
so predicting with another setting never changes what an earlier submission used):

    test.npy (+ ../../test_labels.npy)   the dataset's clean test split (skipped when it has none)
    oof.npy                             the held-out fold; rows = oof_index.npy, so the ensemble
                                        fits its weights on what it will combine
    oof_ood.npy                         the corrupted copies of held-out images (train's ood_check)
    ood/<folder>-<hash>/distortionNN.npy  float16 (5*N, C) per OOD file, rows in the file's order,
                                        one subfolder per OOD folder (the competition's, local suites)
    predict.json                        per output: its source, weights hash and settings

`+bn` (--bn-adapt): batch-norm statistics re-estimated on each OOD file's severity slice (and each
corruption x severity slice of oof_ood) from its own images (competition/adapt.py); clean outputs
exist only in the base setting. `+tent`, `+shot`, `+eata` (--adapt): learned on each slice, named
`+tent-all`, `+tent-norm_head-ens0.99`, ... when --learn-params / --learn-ensemble are not the
defaults; a slice whose learned labels collapse (--collapse-tol) or drift from BN's
(--max-disagree) keeps BN adaptation's logits, and predict says how many did and why.

Work already done (same source, weights and settings in predict.json) is skipped unless --force. OOD files are memory-mapped and predicted batch by batch, so 19 x
50,000 images never sit in memory. Preprocessing is augment.to_input with the run's own
data config, exactly as in training and validation.

TTA (--tta): a preset (none, flip, shift1, shift2) or a comma list of views; see
competition/tta.py. Without --tta each run uses the TTA its training validated (its config's
oof_tta, the view set behind the "held-out accuracy with TTA" train.py reported), or flip when
that is none. Views are averaged as logits (default) or as probabilities (--average prob; the
file then holds log of the mean probability, which softmaxes back to it).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch competition/predict.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from torch import nn

from competition import adapt, augment, data, files, runtime, tta
from competition.files import CompetitionError, cli, count
from competition.loader import eval_loader
from competition.runs import RunDir, expand_runs, setting_name, source_stamp
from competition.specs import PredictSpec


class Predictor:
    """One run's model on the Accelerate device, predicting uint8 image arrays with TTA.

    Every process takes a share of the batches; gather_for_metrics (with each sample's
    position) reassembles them in order and drops the padding of the last shard."""

    def __init__(self, model: nn.Module, data_cfg: dict, accelerator, views: list[tta.View],
                 average: str = "logits", batch_size: int = 512, bar=None):
        self.prep, self.acc, self.views, self.average, self.batch_size, self.bar = (
            data_cfg, accelerator, views, average, batch_size, bar)
        # Not accelerator.prepare(model): DDP is not needed without gradients, and in train mode it
        # would broadcast rank 0's BN buffers over those each rank re-estimated.
        model = model.to(accelerator.device).eval()
        if data_cfg.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.fallbacks = (0, 0)  # learned-adaptation slices predicted, and how many fell back to BN
        self.fallback_reasons = collections.Counter()  # the fallbacks by guard: collapsed, drifted

    def _loader(self, images: np.ndarray, rows: np.ndarray):
        return self.acc.prepare_data_loader(eval_loader(images, rows, batch_size=self.batch_size))

    def predict(self, images: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 (len(rows), C) TTA logits of images[rows] (all rows when None), in that order."""
        rows = np.arange(len(images)) if rows is None else np.asarray(rows)
        out = np.zeros((len(rows), self.prep["num_classes"]), np.float32)
        if not len(rows):
            return out
        for x, _, pos in self._loader(images, rows):
            with self.acc.autocast():
                logits = tta.tta_logits(self.model, x, self.prep, self.views, self.average)
            logits, pos = self.acc.gather_for_metrics((logits.float(), pos))
            out[pos.cpu().numpy()] = logits.cpu().numpy()
            if self.bar is not None:
                self.bar.update(len(pos) * len(self.views))
        return out

    def predict_adapted(self, images: np.ndarray, rows: np.ndarray, blend: float = 1.0) -> np.ndarray:
        """Logits of images[rows] after re-estimating BN statistics on those same images; the
        source statistics are back in place when it returns."""
        def batches():
            for x, _, _ in self._loader(images, rows):
                yield augment.to_input(x, self.prep["mean"], self.prep["std"], self.prep["image_size"],
                                       self.prep["channels_last"])
                if self.bar is not None:
                    self.bar.update(len(x) * self.acc.num_processes)

        reduce = (lambda t: self.acc.reduce(t, "mean")) if self.acc.num_processes > 1 else None
        with adapt.bn_source_stats(self.model):
            # The statistics pass runs in the precision prediction will (bf16 where auto picks it), stated
            # here: autocast entered inside a generator would leak into its caller's frame.
            with self.acc.autocast():
                adapt.adapt_bn(self.model, batches(), blend, reduce)
            return self.predict(images, rows)

    def predict_learned(self, images: np.ndarray, rows: np.ndarray, objective: str = "tent", steps: int = 1,
                        lr: float = 1e-3, batch: int = 128, guard: float | None = 0.1, params: str = "bn",
                        ensemble: float | None = None, disagree: float | None = adapt.MAX_DISAGREE
                        ) -> tuple[np.ndarray, str | None]:
        """(TTA logits of images[rows] after learned adaptation on those same images, why a guard
        fell back to BN adaptation there: 'collapsed', 'drifted', or None when none did), in this
        process alone (a slice is one domain; several processes split the slices, not a slice's
        batches). guard: the collapse guard's tolerance (adapt.collapsed); disagree: the drift
        guard's (adapt.drifted); None turns either off. params, ensemble: adapt.learn's params and
        ensemble_alpha. The source weights are back in place when it returns."""
        dev = self.acc.device

        def batches():  # a fixed order: the result does not depend on which slices came before
            for x, _, _ in eval_loader(images, rows, batch_size=batch):
                yield augment.to_input(x.to(dev), self.prep["mean"], self.prep["std"], self.prep["image_size"],
                                       self.prep["channels_last"])

        def tta_pass() -> np.ndarray:
            out = np.zeros((len(rows), self.prep["num_classes"]), np.float32)
            with torch.no_grad():
                for x, _, pos in eval_loader(images, rows, batch_size=self.batch_size):
                    with self.acc.autocast():
                        z = tta.tta_logits(self.model, x.to(dev), self.prep, self.views, self.average)
                    out[pos.numpy()] = z.float().cpu().numpy()
            return out

        def one_view_labels() -> torch.Tensor:  # the model as it stands, on the untransformed images
            with self.acc.autocast(), torch.no_grad():
                return torch.cat([self.model(x).argmax(1).cpu() for x in batches()])

        def bn_labels() -> torch.Tensor:  # the guards' reference: one view, BN statistics of the slice
            with self.acc.autocast():
                adapt.adapt_bn(self.model, batches())
            return one_view_labels()

        guarded = guard is not None or disagree is not None
        with adapt.source_weights(self.model):
            reference = bn_labels() if guarded else None
            with self.acc.autocast():  # the loss itself is taken in float32 (adapt.slice_loss)
                adapt.learn(self.model, batches, objective, steps, lr, params, ensemble)
            out = tta_pass()
            # the drift guard compares one view with one view: TTA changes some labels by itself
            mine = one_view_labels() if disagree is not None else None
        reason = ("collapsed" if guard is not None and adapt.collapsed(out.argmax(1), reference, out.shape[1], guard)
                  else "drifted" if mine is not None and adapt.drifted(mine, reference, disagree) else None)
        if reason:
            # BN adaptation in this process alone (predict_adapted shares batches across processes,
            # while a learned slice belongs to one of them)
            with adapt.bn_source_stats(self.model):
                with self.acc.autocast():
                    adapt.adapt_bn(self.model, batches())
                out = tta_pass()
        if self.bar is not None:
            passes = len(self.views) + _extra_passes(objective, {"steps": steps, "guard": guard, "disagree": disagree})
            self.bar.update(len(rows) * passes * self.acc.num_processes)
        return out, reason

    def predict_ood(self, images: np.ndarray, mode: str, blend: float = 1.0, slices: int | None = None,
                    learn_args: dict | None = None) -> np.ndarray:
        """float16 logits of OOD images; with adaptation (bn, or a learned objective of
        adapt.OBJECTIVES) each slice of `slices` rows (default: the file's N, one severity) is its
        own domain, adapted separately. Learned slices a guard sent back to BN are counted in
        self.fallbacks (slices, of which fell back) and by reason in self.fallback_reasons."""
        if mode == "none":
            return self.predict(images).astype(np.float16)
        n = slices or len(images) // data.SEVERITIES
        starts = list(range(0, len(images), n))
        if mode == "bn":
            return np.concatenate([self.predict_adapted(images, np.arange(s, s + n), blend)
                                   for s in starts]).astype(np.float16)
        from accelerate.utils import gather_object

        mine = [(k, *self.predict_learned(images, np.arange(s, s + n), mode, **(learn_args or {})))
                for k, s in enumerate(starts) if k % self.acc.num_processes == self.acc.process_index]
        done = {k: (z, why) for k, z, why in (gather_object(mine) if self.acc.num_processes > 1 else mine)}
        reasons = [why for _, why in done.values() if why]
        self.fallbacks = (self.fallbacks[0] + len(starts), self.fallbacks[1] + len(reasons))
        self.fallback_reasons.update(reasons)
        return np.concatenate([done[k][0] for k in range(len(starts))]).astype(np.float16)


# ---------------------------------------------------------------------------- one run


ADAPTATIONS = adapt.ADAPTATIONS  # re-exported: predict --adapt's choices
# PredictSpec.learn_args: one pass of TENT's own settings by default
LEARN_KEYS = ("steps", "lr", "batch", "guard", "params", "ensemble", "disagree")


@dataclass
class Job:
    """One output file of a run: its setting and path there, what makes it current, what to predict."""
    setting: str
    rel: str
    record: dict
    kind: str  # test | oof | oof_ood | ood
    source: object  # the ImageSet, the OOF rows, the OOF-OOD rows, or the OOD file
    passes: int  # forward passes over the images (views, +1 for BN adaptation): the progress bar's units


FALLBACK_WHY = {"collapsed": "fewer predicted classes than BN's",
                "drifted": "over {disagree:.0%} of labels differ from BN's"}


def plan(run: RunDir, cfg: dict, record: dict, n_views: int, ood_sets: list[data.OodSet], spec: PredictSpec,
         test: bool, oof: bool, force: bool, say=print) -> tuple[list[Job], list[str]]:
    """The outputs to (re)write and the ones already current (skipped unless force). Clean images
    (test, OOF) go to the base setting only; OOD files and the corrupted OOF copies to every one
    (the plain setting and each of spec.adapts)."""
    adapts, bn_blend, learn_args = spec.adapts, spec.bn_blend, spec.learn_args
    base = setting_name(record["tta"], record["average"])
    # a learned setting's name carries its params / ensembling only when not the defaults
    named = {a: adapt.variant(a, spec.learn_params, spec.learn_ensemble) if a in adapt.OBJECTIVES else a
             for a in adapts}
    settings = [(base, "none")] + [(setting_name(record["tta"], record["average"], named[a], bn_blend), a)
                                   for a in adapts]
    todo, current = [], []

    def add(job: Job):
        (current if not force and run.is_current(job.setting, job.rel, job.record) else todo).append(job)

    if test:
        ds = data.load(cfg["dataset"], "test", cfg["data_dir"], cfg.get("data"))
        if ds is None:
            say(f"{run}: {cfg.get('data')} has no test/ split; no clean test logits")
        else:
            source = ["test", cfg["dataset"], str(cfg.get("data")), len(ds.labels)]
            add(Job(base, RunDir.PRED_TEST, {**record, "source": source}, "test", ds, len(ds.labels) * n_views))
    rows, ood_rows = run.oof_index(), run.oof_ood_index()
    if oof and rows is None:
        say(f"{run}: no {RunDir.OOF_INDEX} (trained with fold=-1?); no out-of-fold logits")
    elif oof:
        add(Job(base, RunDir.PRED_OOF, {**record, "source": ["oof", len(rows), int(rows.sum())]}, "oof", rows,
                len(rows) * n_views))
    for setting, a in settings:
        extra = {"adapt": a, **({"bn_blend": bn_blend} if a == "bn" else {}),
                 **({f"{a}_{k}": v for k, v in (learn_args or {}).items()} if a in adapt.OBJECTIVES else {})} \
            if a != "none" else {}
        if oof and ood_rows is not None:
            source = ["oof_ood", list(ood_rows.shape), int(ood_rows.sum()), run.data_config().get("ood_check_seed")]
            add(Job(setting, RunDir.PRED_OOF_OOD, {**record, **extra, "source": source}, "oof_ood", ood_rows,
                    ood_rows.size * (n_views + _extra_passes(a, learn_args))))
        for ood in ood_sets:
            for src, n in zip(ood.files, ood.rows):
                add(Job(setting, RunDir.ood_rel(ood, src), {**record, **extra, "source": source_stamp(src),
                                                            "ood_files": len(ood.files)}, "ood", src,
                        n * (n_views + _extra_passes(a, learn_args))))
    return todo, [f"{j.setting}/{j.rel}" for j in current]


def _extra_passes(adapt_mode: str, learn_args: dict | None) -> int:
    """Passes over a slice besides the TTA views: BN's statistics; a learned one's steps and
    statistics, the guards' BN reference (statistics and labels) and the drift guard's own labels."""
    args = learn_args or {}
    guarded, drift = args.get("guard") is not None or args.get("disagree") is not None, args.get("disagree") is not None
    return {"none": 0, "bn": 1}.get(adapt_mode, 1 + args.get("steps", 1) + 2 * guarded + drift)


def oof_ood_images(run: RunDir, cfg: dict, train_set, rows: np.ndarray) -> np.ndarray:
    """The run's corrupted held-out copies (train's ood_check): the same generator, seed and cache.
    A cache file that holds other than one image per row of `rows` (replaced by hand, or written by
    another version) is made again: predicted as it was, it gave an oof_ood.npy of the wrong shape
    that only the ensemble tripped over."""
    from competition import corruptions

    seed = run.data_config("ood_check_seed")["ood_check_seed"]
    cache = Path(cfg["data_dir"]) / "cache"
    out = corruptions.corrupted_copies(train_set.images, seed, cache_dir=cache, cells=rows)
    want = (rows.size, *train_set.images.shape[1:])
    if out.shape != want or out.dtype != np.uint8:
        print(f"note: the corrupted-copies cache in {cache} held {out.dtype} {out.shape}, not this run's {want} check "
              f"images: made again", file=sys.stderr)
        # Made in a folder of its own, then moved over the bad file: its name depends on the key alone.
        with tempfile.TemporaryDirectory(dir=cache, prefix=".rebuild-") as tmp:
            out = corruptions.corrupted_copies(train_set.images, seed, cache_dir=tmp, cells=rows)
            for made in Path(tmp).iterdir():
                os.replace(made, cache / made.name)
    return out


def checked_train_set(run: RunDir, cfg: dict, jobs: list[Job], acc):
    """The train split the out-of-fold jobs predict from (None when no job does), once the run's
    index files fit it, before any output is written: rows in 0..N-1 (numpy would take -1 for
    the last image without a word), and oof_ood_index one row of images per corruption and severity."""
    if not any(j.kind in ("oof", "oof_ood") for j in jobs):
        return None
    with acc.main_process_first():
        train_set = data.load(cfg["dataset"], "train", cfg["data_dir"], cfg.get("data"))
    n, fix = len(train_set.labels), f"the run was trained on other data, or the file was edited: retrain {run.path}"
    if run.oof_index() is not None:
        data.check_rows(run / RunDir.OOF_INDEX, run.oof_index(), n, fix)
    cells = run.oof_ood_index()
    if cells is not None:
        if cells.ndim != 2 or len(cells) != data.OOD_FILES * data.SEVERITIES:
            raise CompetitionError(f"{run / RunDir.OOF_OOD_INDEX}: shape {cells.shape}, but it holds one row of "
                                   f"images per corruption and severity ({data.OOD_FILES * data.SEVERITIES}, n): {fix}")
        data.check_rows(run / RunDir.OOF_OOD_INDEX, cells, n, fix)
    return train_set


def execute(run: RunDir, cfg: dict, pred: Predictor, jobs: list[Job], bn_blend: float, main: bool,
            train_set=None) -> None:
    """Predict every job and write its output (main process only); train_set: checked_train_set's."""
    for job in jobs:
        mode = job.record.get("adapt", "none")
        learn_args = {k: job.record[f"{mode}_{k}"] for k in LEARN_KEYS} if mode in adapt.OBJECTIVES else None
        before, reasons_before = pred.fallbacks, collections.Counter(pred.fallback_reasons)
        if job.kind == "test":
            logits = pred.predict(job.source.images)
            if main:
                run.save_test(job.setting, logits, job.source.labels, job.record)
            continue
        if job.kind == "oof":
            logits = pred.predict(train_set.images, job.source)
        elif job.kind == "oof_ood":  # 95 slices of n images: each (corruption, severity) adapted alone
            logits = pred.predict_ood(oof_ood_images(run, cfg, train_set, job.source), mode, bn_blend,
                                      slices=job.source.shape[-1], learn_args=learn_args)
        else:
            logits = pred.predict_ood(data.open_ood(job.source, image_shape=None), mode, bn_blend,
                                      learn_args=learn_args)
        fell = pred.fallbacks[1] - before[1]
        if fell:
            why = pred.fallback_reasons - reasons_before
            reasons = ", ".join(f"{why[r]} {r} ({FALLBACK_WHY[r].format(**learn_args)})"
                                for r in FALLBACK_WHY if why[r])
            pred.acc.print(f"{job.setting}/{job.rel}: {fell} of {pred.fallbacks[0] - before[0]} slices kept BN "
                           f"adaptation under {mode}: {reasons}")
        if main:
            run.write_output(job.setting, job.rel, logits, job.record)


def predict_run(run_dir, ood_dirs=(), spec: PredictSpec | None = None, test: bool = True, oof: bool = True,
                force: bool = False, accelerator=None, allow_partial: bool = False) -> dict:
    """Write the run's TTA logits (see the module docstring) as `spec` says (default PredictSpec():
    the TTA of the run's config, oof_tta, or flip when that is none; no adapted settings). test,
    oof: also the clean test split and the held-out fold. Returns {output path: 'written' |
    'skipped'}. A run trained on cifar100 needs the competition's full OOD set (19 files x 50,000
    rows) unless allow_partial."""
    spec = spec or PredictSpec()
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run.check_unlocked("predicting with it")
    acc = accelerator or runtime.make_accelerator()
    model, cfg, data_cfg = run.load_model(map_location="cpu")  # refuses weights that are not finite floats
    files.check_writable(run.path, "run folder")
    if spec.tta:
        views = tta.parse_tta(spec.tta)
    else:
        views = tta.parse_tta(cfg.get("oof_tta") or "none")
        views = views if tta.tta_name(views) != "none" else tta.TTA_PRESETS["flip"]
    adapts, average = list(spec.adapts), spec.average
    unknown = [a for a in adapts if a not in ADAPTATIONS]
    if unknown:
        raise CompetitionError(f"--adapt {','.join(unknown)}: adaptations are {', '.join(ADAPTATIONS)}")
    if spec.learn_params not in adapt.PARAMS:
        raise CompetitionError(f"--learn-params {spec.learn_params}: one of {', '.join(adapt.PARAMS)}")
    if adapts and not adapt.batchnorms(model):
        raise CompetitionError(f"{run}: {cfg['model']} has no batch-norm layers, so --adapt {','.join(adapts)} has "
                               f"nothing to adapt; predict without it")
    record = {"tta": tta.tta_name(views), "average": average, "weights": run.weights_hash()}
    # one folder named twice (relative and absolute: the pipeline does when --ood-dir is its local suite) is
    # predicted once, not twice into the same files
    ood_dirs = list({Path(d).resolve(): d for d in ood_dirs}.values())
    ood_sets = [data.OodSet(d, data.OodSet.required_shape(d, [cfg["dataset"]], allow_partial)) for d in ood_dirs]
    size = data_cfg.get("source_image_size")  # runs trained before it was recorded: not checked
    for ood in ood_sets:
        if size and tuple(ood.image_size) != tuple(size):
            raise CompetitionError(f"{ood.path} holds {ood.image_size[0]}x{ood.image_size[1]} images, but {run} was "
                                   f"trained on {size[0]}x{size[1]} ones: they would be resized silently into the "
                                   f"submission; these are not the test files for this run")
    with acc.main_process_first():  # plan reads the test split: one process downloads it, the others wait
        jobs, current = plan(run, cfg, record, len(views), ood_sets, spec, test, oof, force, acc.print)
    status = {str(run.path / RunDir.PRED / rel): "skipped" for rel in current}
    for j in jobs:  # before any work: a sent run's pred/ may link outside it; the OOF-OOD copies need their seed
        run.own(run.pred_dir(j.setting) / j.rel)
        if j.kind == "oof_ood":
            run.data_config("ood_check_seed")
    if not jobs:
        acc.print(f"{run}: all {len(current)} outputs up to date (--force redoes them)")
        return status
    train_set = checked_train_set(run, cfg, jobs, acc)
    bar = runtime.progress(sum(j.passes for j in jobs), f"predict {run.name}", acc.is_main_process, unit="img")
    t0 = time.time()
    execute(run, cfg, Predictor(model, data_cfg, acc, views, average, spec.batch_size, bar), jobs, spec.bn_blend,
            acc.is_main_process, train_set)
    bar.close()
    acc.wait_for_everyone()
    status.update({str(run.pred_dir(j.setting) / j.rel): "written" for j in jobs})
    acc.print(f"{run}: {len(jobs)} written, {len(current)} up to date, TTA {record['tta']} ({len(views)} views, "
              f"{average} averaged){', adapted: ' + ', '.join(adapts) if adapts else ''}, {time.time() - t0:.1f} s")
    return status


# ---------------------------------------------------------------------------- entry point


def main(argv=None):
    default = PredictSpec()  # the flags' defaults are the spec's
    p = argparse.ArgumentParser(prog="python -m competition.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (models/<run>) or quoted glob patterns")
    p.add_argument("--ood-dir", action="append", default=[],
                   help="folder of distortionNN.npy (the competition's, or a local suite); repeatable")
    p.add_argument("--download", action="store_true",
                   help="fetch the 19 competition OOD files into --ood-dir first when missing")
    p.add_argument("--tta", default=None, help="preset (none, flip, shift1, shift2) or views; default: the "
                   "run's oof_tta (the TTA its reported accuracy used), else flip")
    p.add_argument("--average", default=default.average, choices=("logits", "prob"), help="how TTA views are averaged")
    p.add_argument("--bn-adapt", action="store_true", default=None,
                   help="also write BN-adapted OOD logits; = --adapt bn")
    p.add_argument("--adapt", default=None, help="adapted OOD logits to write besides the plain ones, comma-"
                   "separated: bn, and the learned tent, shot, eata (competition/adapt.py; episodic per OOD file "
                   "and severity)")
    p.add_argument("--tent-steps", "--learn-steps", type=count, default=default.learn_steps, dest="tent_steps",
                   help="learned adaptation (tent, shot, eata): passes over each slice, lr on a cosine to 0 when > 1 "
                        "(default 1)")
    p.add_argument("--tent-lr", "--learn-lr", type=float, default=default.learn_lr, dest="tent_lr",
                   help="learned adaptation: Adam learning rate (default 1e-3)")
    p.add_argument("--tent-batch", "--learn-batch", type=count, default=default.learn_batch, dest="tent_batch",
                   help="learned adaptation: images per update (default 128)")
    p.add_argument("--learn-params", default=default.learn_params, choices=adapt.PARAMS,
                   help="learned adaptation: which parameters learn: bn (BN scale and shift, TENT's; default), "
                        "norm+head (and the classifier layer), all (every one); not bn: the setting is named "
                        "+<objective>-norm_head / -all")
    p.add_argument("--learn-ensemble", type=float, default=default.learn_ensemble, metavar="ALPHA",
                   help="learned adaptation: after every update params = ALPHA * params + (1 - ALPHA) * source "
                        "(ROID's weight ensembling against drift, e.g. 0.99; 0 keeps the source); default off; "
                        "the setting is named +<objective>-ensALPHA")
    p.add_argument("--collapse-tol", type=float, default=default.collapse_tol,
                   help="learned adaptation falls back to BN on a slice whose predicted classes spread less than "
                        "BN's by more than this (class-histogram entropy, nats; no labels); < 0: no guard")
    p.add_argument("--max-disagree", type=float, default=default.max_disagree,
                   help="learned adaptation falls back to BN on a slice where its labels differ from BN's on more "
                        "than this fraction of the images (one view each; no labels; default 0.15: tune it on the "
                        "choose images, never the measure); < 0: no guard")
    p.add_argument("--bn-blend", type=float, default=default.bn_blend,
                   help="BN statistics = ALPHA * adapted + (1 - ALPHA) * source (default 1)")
    p.add_argument("--batch-size", type=count, default=default.batch_size, help="images per batch per process")
    p.add_argument("--no-test", action="store_true", help="skip the clean test split")
    p.add_argument("--no-oof", action="store_true", help="skip the out-of-fold TTA logits")
    p.add_argument("--force", action="store_true", help="redo outputs that are up to date")
    p.add_argument("--allow-partial", action="store_true",
                   help="accept fewer OOD files or rows than the competition's 19 x 50,000 (cifar100 runs)")
    args = p.parse_args(argv)
    spec = predict_spec(args)
    if spec.tta:
        tta.parse_tta(spec.tta)  # a bad --tta: its message before anything is downloaded or loaded
    acc = runtime.make_accelerator()
    if args.download:  # the competition's files only: a local suite is made by competition.score suite
        with acc.main_process_first():
            for d in args.ood_dir:
                if not (Path(d) / "corruptions.json").exists():
                    data.ood_files(d, download=True)
    runs = expand_runs(args.runs)
    for run in runs:
        predict_run(run, args.ood_dir, spec, test=not args.no_test, oof=not args.no_oof, force=args.force,
                    accelerator=acc, allow_partial=args.allow_partial)
    return [r.path for r in runs]


def predict_spec(args: argparse.Namespace) -> PredictSpec:
    """The PredictSpec of predict's command line (--adapt wins over --bn-adapt)."""
    adapts = [a.strip() for a in args.adapt.split(",") if a.strip()] if args.adapt else ["bn"] * bool(args.bn_adapt)
    return PredictSpec(tta=args.tta, average=args.average, adapts=tuple(adapts), bn_blend=args.bn_blend,
                       learn_steps=args.tent_steps, learn_lr=args.tent_lr, learn_batch=args.tent_batch,
                       learn_params=args.learn_params, learn_ensemble=args.learn_ensemble,
                       collapse_tol=args.collapse_tol if args.collapse_tol >= 0 else None,
                       max_disagree=args.max_disagree if args.max_disagree >= 0 else None, batch_size=args.batch_size)


if __name__ == "__main__":
    cli(main)()
