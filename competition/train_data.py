"""A training run's data: its images in memory, its rows (training folds, held-out fold,
the corrupted check images), its DataLoaders per epoch, and what the data decides for the
model (`resolve_data_config`: classes, input statistics, image size).

The loop (competition/train.py) asks `TrainData.loader(epoch)` for each epoch's batches; the
batch schedule, CPU augmentation and progressive resizing of the config decide which loader.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from competition import augment, data, folds, optim
from competition.files import CompetitionError
from competition.loader import ImageRows, as_batch, eval_loader
from competition.runs import RunDir
from competition.specs import AugmentSpec, DataSpec, TrainSpec


def split_rows(spec: DataSpec, labels: np.ndarray, accelerator) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Training and held-out rows for the spec's fold from folds/<dataset>.csv (written with the
    defaults, k=5 seed 0, when it does not exist yet), and the id of its measure reserve."""
    name = folds.dataset_name(spec.dataset, spec.data)
    path = folds.folds_path(name, spec.folds_dir)
    if not path.exists() and accelerator.is_main_process:
        folds.write_folds(folds.folds_frame(labels), path)
        print(f"wrote {path} (k=5, seed=0); run `python -m competition.folds` to choose others")
    accelerator.wait_for_everyone()
    frame = folds.read_folds(path)
    if len(frame) != len(labels) or not np.array_equal(frame["label"].to_numpy(), labels):
        if len(frame) != len(labels):
            why = f"{len(frame)} rows, this one has {len(labels)} images"
        else:  # the same count: name the first row whose label differs (an edit, or other images in that order)
            diff = np.flatnonzero(frame["label"].to_numpy() != labels)
            why = (f"{len(diff)} labels differ, first row {diff[0]}: label {frame['label'].iloc[diff[0]]} in the file, "
                   f"{labels[diff[0]]} in the data")
        raise CompetitionError(f"{path} was made for a different dataset ({why}); rerun `python -m competition.folds "
                               f"--force` for it")
    train_rows, val_rows = folds.fold_rows(frame["fold"].to_numpy(), spec.fold, path, spec.exclude_folds)
    reserve = folds.reserve_id(folds.measure_rows(frame))
    if spec.fold == -1:
        return train_rows, val_rows, reserve
    n_classes = int(labels.max()) + 1
    for rows, what in ((train_rows, "training folds"), (val_rows, f"held-out fold {spec.fold}")):
        absent = np.setdiff1d(np.arange(n_classes), labels[rows])
        if len(absent):  # its accuracy would not measure those classes, and the OOF logits would not cover them
            raise CompetitionError(f"{path}: the {what} hold no image of class(es) {absent[:10].tolist()}: make "
                                   f"stratified folds with fewer splits (python -m competition.folds --k 2 --force) "
                                   f"or add images of those classes")
    return train_rows, val_rows, reserve


def ood_check_set(spec: DataSpec, images: np.ndarray, labels: np.ndarray, val_rows: np.ndarray):
    """(held-out rows (19 * 5, n), their corrupted copies (19 * 5 * n, H, W, 3), labels) for ood_check."""
    from competition import corruptions

    seed = folds.ood_check_seed(spec.fold)
    cells = folds.ood_check_cells(val_rows, spec.ood_check, seed, len(corruptions.CORRUPTIONS) * corruptions.SEVERITIES)
    copies = corruptions.corrupted_copies(images, seed, cache_dir=Path(spec.data_dir) / "cache", cells=cells)
    return cells, copies, labels[cells].reshape(-1)


def cpu_aug_at(spec: AugmentSpec, epoch: int) -> str:
    """The per-image CPU augmentation at `epoch` (cpu_aug, strong from strong_aug_epoch)."""
    late = spec.strong_aug_epoch is not None and epoch >= spec.strong_aug_epoch
    return "strong" if late else spec.cpu_aug


def train_size_at(spec: DataSpec, epoch: int, image_size: int) -> int:
    """Training image size at `epoch` under progressive resizing (train_sizes)."""
    size = image_size
    for start, s in sorted((int(k), v) for k, v in (spec.train_sizes or {}).items()):
        if epoch >= start:
            size = s
    return size



class TrainData:
    """The run's images in memory, its row sets, and its DataLoaders.

    Rows: `train_rows` (the training folds, or a subset), `val_rows` (the whole held-out fold:
    the OOF logits), `val_check_rows` (what each epoch evaluates), `train_eval_rows` (clean
    accuracy on training images). `loader(epoch)` returns that epoch's training loader; one is
    made per (batch size, CPU augmentation, image size) of the schedule and reused, and its
    shuffle is reseeded from (seed, epoch), so an epoch's order does not depend on resuming."""

    def __init__(self, spec: TrainSpec, accelerator):
        self.spec, self.acc = spec, accelerator
        d, seed = spec.data, spec.loop.seed
        # Evaluation batches per process: at least the training one (no gradients: it fits), at least 256.
        self.eval_batch = max(process_batch(spec, spec.optim.batch_size, accelerator.num_processes), 256)
        # One process downloads and extracts (CIFAR, an image-folder tarball) while the others
        # wait, then they read its files: N processes writing one path at once corrupt it.
        with accelerator.main_process_first():
            ds = data.load(d.dataset, "train", d.data_dir, d.data)
        if len(ds.classes) < 2:
            raise CompetitionError(f"{d.data or d.dataset}: {len(ds.classes)} class ({ds.classes}); a "
                                   f"classifier needs at least 2 (an image folder holds one sub-folder per class)")
        self.images, self.labels, self.classes = ds.images, ds.labels, list(ds.classes)
        self.data_sha1 = data.data_id(ds)  # the source data, before any pseudo-labels
        train_rows, self.val_rows, self.measure_reserve = split_rows(d, ds.labels, accelerator)
        self.train_rows = data.sample_rows(train_rows, d.train_subset, seed)
        self.soft = None  # (N, C) soft targets of every row when pseudo-labelled images join the training set
        if d.pseudo:
            self._add_pseudo(d.pseudo, len(ds.classes))
        self.val_check_rows = data.sample_rows(self.val_rows, d.val_subset, seed + 1)
        n = d.eval_train or 0
        self.train_eval_rows = data.sample_rows(self.train_rows, n, seed + 2) if n else np.arange(0)
        self.val_loader = self.eval_loader(self.val_check_rows) if len(self.val_check_rows) else None
        self.train_eval_loader = self.eval_loader(self.train_eval_rows) if len(self.train_eval_rows) else None
        self.ood_rows, self.ood_loader = np.zeros((0, 0), np.int64), None
        if d.ood_check and len(self.val_rows):
            self.ood_rows, images, labels = ood_check_set(d, self.images, self.labels, self.val_rows)
            self.ood_loader = accelerator.prepare(eval_loader(images, np.arange(len(images)), labels,
                                                              self.eval_batch))
        self._sized: dict[int, np.ndarray] = {}
        self._loaders: dict[tuple, object] = {}
        self._shuffle = torch.Generator()

    def _add_pseudo(self, path, n_classes: int) -> None:
        """Append the pseudo-labelled OOD images of `path` (competition.selftrain writes it) to the
        training rows, with their soft targets; the labelled rows get one-hot targets."""
        from competition.files import read_npz

        z = read_npz(path, ("images", "probs"), "a pseudo-label file written by competition.selftrain")
        images, probs = data.check_pseudo(path, z["images"], z["probs"], self.images.shape[1:], n_classes)
        probs = probs.astype(np.float32)
        n = len(self.images)
        self.soft = np.concatenate([np.eye(n_classes, dtype=np.float32)[self.labels], probs])
        self.images = np.concatenate([self.images, images])
        self.labels = np.concatenate([self.labels, probs.argmax(1)])
        self.train_rows = np.concatenate([self.train_rows, n + np.arange(len(images))])

    def targets(self, pos: torch.Tensor, smoothing: float) -> torch.Tensor:
        """Soft targets of a training batch (positions in train_rows), label smoothing applied."""
        t = torch.from_numpy(self.soft[self.train_rows[pos.cpu().numpy()]])
        t = t * (1 - smoothing) + smoothing / t.shape[1]
        return t.pin_memory() if torch.cuda.is_available() else t  # pinned: the upload does not block the host

    def eval_loader(self, rows: np.ndarray):
        return self.acc.prepare(eval_loader(self.images, rows, self.labels, self.eval_batch))

    def images_at(self, size: int) -> np.ndarray:
        """The images at a training size below the stored one, resized once (not every batch:
        10% of a 24 px CPU step). Only shrinking: a 32 -> 224 copy would not fit in memory."""
        if size >= self.images.shape[1]:
            return self.images
        if size not in self._sized:
            self._sized[size] = augment.shrink_images(self.images, size)
        return self._sized[size]

    def loader(self, epoch: int, image_size: int):
        """(loader, batch size, CPU augmentation, image size) of `epoch`."""
        spec, seed = self.spec, self.spec.loop.seed
        bs, kind = optim.batch_size_at(spec.optim, epoch), cpu_aug_at(spec.augment, epoch)
        size = train_size_at(spec.data, epoch, image_size)
        micro = process_batch(spec, bs, self.acc.num_processes)
        if (bs, kind, size) not in self._loaders:
            workers = spec.data.workers if kind not in (None, "none") else 0
            dl = torch.utils.data.DataLoader(
                ImageRows(self.images_at(size), self.train_rows, self.labels, augment.cpu_pipeline(kind)),
                batch_size=micro, sampler=torch.utils.data.RandomSampler(range(len(self.train_rows)),
                                                                         generator=self._shuffle),
                drop_last=len(self.train_rows) >= micro * self.acc.num_processes, collate_fn=as_batch,
                num_workers=workers, pin_memory=torch.cuda.is_available(),
                worker_init_fn=functools.partial(seed_worker, process=self.acc.process_index))
            self._loaders[(bs, kind, size)] = self.acc.prepare(dl)
        self._shuffle.manual_seed(seed * 100_003 + epoch)
        loader = self._loaders[(bs, kind, size)]
        transform = loader.dataset.transform
        if transform is not None and not loader.num_workers:  # in this process: seeded per (seed, epoch, rank)
            transform.set_random_seed(int(np.random.SeedSequence([seed, epoch, self.acc.process_index])
                                          .generate_state(1)[0]))
        return loader, bs, kind, size


def process_batch(spec: TrainSpec, global_batch: int, processes: int) -> int:
    """Images per process per forward pass for a global batch (batch_size = images per
    optimizer update, all processes and accumulation steps together). The global batch is held
    constant, so a run means the same updates at the same lr on 1 GPU or 8 (no lr scaling rule
    to apply); it must split evenly."""
    parts = processes * spec.optim.grad_accum
    if global_batch % parts:
        raise CompetitionError(f"batch_size={global_batch} (the global batch: images per optimizer update) does not "
                               f"split over {processes} process(es) x grad_accum {spec.optim.grad_accum}; choose a "
                               f"multiple of {parts}")
    micro = global_batch // parts
    if (spec.augment.mixup or spec.augment.cutmix) and micro % 2:
        raise CompetitionError(f"batch_size={global_batch} gives {micro} images per process and step, odd; mixup/cutmix "
                               f"pair images within a batch: choose a multiple of {2 * parts}")
    return micro


def seed_worker(worker_id: int, process: int = 0) -> None:
    """worker_init_fn: albumentations keeps its own random state, which DataLoader's worker
    seeding does not touch, so without this every worker (and every epoch, and every process)
    would repeat the same augmentations. torch gives each worker of each epoch its own seed
    (drawn from the checkpointed global RNG); the process index separates DDP ranks."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        transform.set_random_seed(int(np.random.SeedSequence([info.seed % 2**32, process]).generate_state(1)[0]))


def resolve_data_config(spec: TrainSpec, td: TrainData) -> dict:
    """What the data decides, kept apart from the user's config (timm's resolve_data_config
    idea): the classes, the input statistics of the training images, the model's image size."""
    mean, std = augment.input_stats(td.images[td.train_rows], spec.data.norm)
    if spec.model.init_from:  # fine-tuning: the weights expect the inputs they were trained on
        source = RunDir(spec.model.init_from).data_config()
        mean, std = source["mean"], source["std"]
    out = {"num_classes": len(td.classes), "classes": td.classes, "mean": mean, "std": std,
           "image_size": int(spec.data.image_size or td.images.shape[1]), "channels_last": spec.model.channels_last}
    if td.ood_rows.size:
        out["ood_check_seed"] = folds.ood_check_seed(spec.data.fold)
    if td.measure_reserve:  # the images score's leak check knows this run never saw
        out["measure_reserve"] = td.measure_reserve
    out["data_sha1"] = td.data_sha1
    out["source_image_size"] = list(td.images.shape[1:3])  # OOD files must hold images of this size
    return out

