"""Data sources: every one returns uint8 images (N, H, W, 3), int64 labels and class names.

    cifar100     torchvision's CIFAR-100 (python pickle format), downloaded when absent
    cifar10      torchvision's CIFAR-10, the same way (the CPU presets were tuned on it)
    imagefolder  a directory or .tar/.tar.gz of [split/]<class>/<image> (any Kaggle image set)
    digits       the embedded default: scikit-learn's bundled 8x8 digits as 32x32 RGB

plus the competition's OOD test files (`distortionNN.npy`, uint8 (5*N, 32, 32, 3),
severity-major). All images live in memory as uint8: CIFAR-100 is 150 MB, and nothing
decodes files per training step.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import re
import stat
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from competition.files import CompetitionError, atomic_path

SOURCES = ("digits", "cifar100", "cifar10", "imagefolder")
OOD_URL = "https://github.com/DL4DS/ood-test-files/raw/main/ood-test/{name}"
OOD_FILES = 19
SEVERITIES = 5
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    classes: list[str]

    def __post_init__(self):
        check_images(self.images, "images")
        if self.labels.shape != (len(self.images),):
            raise CompetitionError(f"{len(self.images)} images but labels of shape {self.labels.shape}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise CompetitionError(
                f"labels must lie in 0..{len(self.classes) - 1}, found {self.labels.min()}..{self.labels.max()}")


def check_images(images: np.ndarray, where: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise CompetitionError(f"{where}: expected uint8 images of shape (N, H, W, 3), got {desc}")


def load(source: str, split: str = "train", data_dir: str | os.PathLike = "data",
         path: str | os.PathLike | None = None, download: bool = True) -> ImageSet | None:
    """Load one split of a data source. Returns None when the source has no such split
    (an image folder without `test/`)."""
    if source == "digits":
        return load_digits(split)
    if source == "cifar100":
        return load_cifar100(data_dir, split, download)
    if source == "cifar10":
        return load_cifar10(data_dir, split, download)
    if source == "imagefolder":
        if path is None:
            raise CompetitionError("--dataset imagefolder needs --data PATH (a folder or .tar.gz of <class>/<image>)")
        return load_imagefolder(path, split, cache_dir=Path(data_dir) / "cache")
    raise CompetitionError(f"unknown dataset {source!r}; choose one of {', '.join(SOURCES)}")


# ---------------------------------------------------------------------------- digits
def load_digits(split: str = "train") -> ImageSet:
    """scikit-learn's 1,797 bundled 8x8 digits as 32x32 RGB photos of a sort: each digit upscaled
    to 24x24, placed at a random offset, in a random ink colour on a random background colour,
    with a little sensor noise. Colour and position say nothing about the class (so a model
    must read the shape, and flips and shifts at test time matter, as in CIFAR), and small
    models land clearly below 100%, so the demo's ensemble, TTA and adaptation have something to
    show. Deterministic (seed 0). The 'test' split is a fixed stratified 20%."""
    images, labels, splits = _digits()
    idx = splits.get(split)
    if idx is None:
        raise CompetitionError(f"digits has splits 'train' and 'test', not {split!r}")
    return ImageSet(images[idx], labels[idx], [str(i) for i in range(10)])  # indexing copies: the cache stays


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, dict]:
    """load_digits' images, labels and split rows, made once per process: an ablation study or a
    test session loads them dozens of times, a few tenths of a second each (read-only: callers get
    copies)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    rng = np.random.default_rng(0)
    n = len(d.target)
    grey = (d.images / 16.0).astype(np.float32)  # (N, 8, 8) in [0, 1]
    big = np.kron(grey, np.ones((3, 3), np.float32))  # nearest 8 -> 24; the blur below softens it
    big = (big + np.roll(big, 1, 1) + np.roll(big, 1, 2) + np.roll(big, (1, 1), (1, 2))) / 4
    canvas = np.zeros((n, 32, 32), np.float32)
    dy, dx = rng.integers(3, 6, n), rng.integers(3, 6, n)  # within +-1 px of the centre
    for i in range(n):
        canvas[i, dy[i]:dy[i] + 24, dx[i]:dx[i] + 24] = big[i]
    # light ink on dark paper, both of random hue
    paper, ink = rng.uniform(0, 0.4, (n, 1, 1, 3)), rng.uniform(0.6, 1, (n, 1, 1, 3))
    rgb = paper + (ink - paper) * canvas[..., None] + rng.normal(0, 0.04, (n, 32, 32, 3))
    images = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    for shared in (images, labels, idx_train, idx_test):
        shared.flags.writeable = False
    return images, labels, {"train": idx_train, "test": idx_test}


# ---------------------------------------------------------------------------- cifar100
def load_cifar100(data_dir, split: str = "train", download: bool = True) -> ImageSet:
    """CIFAR-100 from `data_dir/cifar-100-python/`; downloaded there with torchvision when absent.

    The pickles are read directly rather than through torchvision.datasets.CIFAR100, which
    insists on the md5 of the official archive: a converted or partial copy would be refused
    with a message that does not say which file is wrong.
    """
    root = Path(data_dir) / "cifar-100-python"
    if split not in ("train", "test"):
        raise CompetitionError(f"cifar100 has splits 'train' and 'test', not {split!r}")
    if not (root / split).exists():
        if not download:
            raise CompetitionError(f"{root / split} is missing: put the extracted cifar-100-python/ folder in "
                                   f"{Path(data_dir).resolve()} (or allow the download)")
        try:
            from torchvision.datasets import CIFAR100
            CIFAR100(root=str(data_dir), train=split == "train", download=True)
        except Exception as e:  # no network, proxy, disk full: one message with the fix
            raise CompetitionError(
                f"could not download CIFAR-100 into {Path(data_dir).resolve()} ({type(e).__name__}: {e}). "
                f"Offline? Copy the extracted cifar-100-python/ folder (train, test, meta) there.") from None
    batch = _unpickle(root / split)
    meta = _unpickle(root / "meta")
    try:
        flat = _cifar_array(batch[b"data"], root / split, "data", "u", "uint8 pixels 0-255")
        labels = _cifar_array(batch[b"fine_labels"], root / split, "fine_labels", "iu", "whole-number class indices")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[b"fine_label_names"]]
    except KeyError as e:
        raise CompetitionError(f"{root}: pickle lacks the key {e}; is this the python version of CIFAR-100?") from None
    if flat.ndim != 2 or flat.shape[1] != 3 * 32 * 32:
        raise CompetitionError(f"{root / split}: data has shape {flat.shape}, expected (N, 3072)")
    images = flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()  # CHW rows -> NHWC
    return ImageSet(images, labels, classes)


def load_cifar10(data_dir, split: str = "train", download: bool = True) -> ImageSet:
    """CIFAR-10 from `data_dir/cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta);
    downloaded there with torchvision when absent. The presets measured on 2 CPU cores
    (part1_cpu) were tuned on CIFAR-10, the stand-in for CIFAR-100 on small machines."""
    root = Path(data_dir) / "cifar-10-batches-py"
    if split not in ("train", "test"):
        raise CompetitionError(f"cifar10 has splits 'train' and 'test', not {split!r}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all((root / n).exists() for n in names):
        if not download:
            raise CompetitionError(f"{root} is incomplete: put the extracted cifar-10-batches-py/ folder in "
                                   f"{Path(data_dir).resolve()} (or allow the download)")
        try:
            from torchvision.datasets import CIFAR10
            CIFAR10(root=str(data_dir), train=split == "train", download=True)
        except Exception as e:
            raise CompetitionError(
                f"could not download CIFAR-10 into {Path(data_dir).resolve()} ({type(e).__name__}: {e}). "
                f"Offline? Copy the extracted cifar-10-batches-py/ folder there, or use --dataset imagefolder "
                f"--data PATH with a folder/.tar.gz of <class>/<image> files.") from None
    batches = [_unpickle(root / n) for n in names]
    meta = _unpickle(root / "batches.meta")
    try:
        flat = np.concatenate([_cifar_array(b[b"data"], root / n, "data", "u", "uint8 pixels 0-255")
                               for b, n in zip(batches, names)])
        labels = np.concatenate([_cifar_array(b[b"labels"], root / n, "labels", "iu", "whole-number class indices")
                                 for b, n in zip(batches, names)])
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[b"label_names"]]
    except KeyError as e:
        raise CompetitionError(f"{root}: pickle lacks the key {e}; is this the python version of CIFAR-10?") from None
    if flat.ndim != 2 or flat.shape[1] != 3 * 32 * 32:
        raise CompetitionError(f"{root}: data has shape {flat.shape}, expected (N, 3072)")
    return ImageSet(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels, classes)


def _cifar_array(value, path: Path, key: str, kinds: str, want: str) -> np.ndarray:
    """A CIFAR pickle's data (uint8) or labels (integers) as they are stored, never cast: a converted
    copy's float pixels (0-1, or 0-255 with fractions) or float labels would otherwise be truncated
    to other images and classes without a word."""
    try:
        array = np.asarray(value)
    except ValueError:  # a ragged list
        array = np.asarray(value, dtype=object)
    if not array.size:  # nothing to misread; the shape checks that follow name the file
        return array
    right_type = array.dtype == np.uint8 if kinds == "u" else array.dtype.kind in kinds
    if not right_type or array.min() < 0:
        raise CompetitionError(f"{path}: {key} is {array.dtype}"
                               f"{' with negative values' if right_type else ''}, expected {want} (the python "
                               f"version of CIFAR stores them so; a converted copy?): delete the folder and "
                               f"download it again")
    return array if kinds == "u" else array.astype(np.int64)


class _ArraysOnly(pickle.Unpickler):
    """An unpickler for CIFAR's python format that admits only what those files hold: dicts,
    lists, bytes, strings, numbers and numpy arrays. Plain pickle.load would run whatever code a
    doctored `data_batch_1` or `meta` names (a copy off a shared drive, a forum tarball); here any
    other global is refused before it is looked up. Written by hand: neither torchvision nor numpy
    offers a restricted loader for this format (torch's weights_only reads only torch's zip files)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               *((mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
                 for name in ("_reconstruct", "scalar")),
               *((mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric"))}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR pickle never holds (refused "
                                         f"unrun: a pickle can execute code)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            out = _ArraysOnly(f, encoding="bytes").load()
    except FileNotFoundError:
        raise CompetitionError(f"{path} is missing: the cifar-100-python/ folder needs train, test and meta") from None
    except Exception as e:
        raise CompetitionError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e}); "
                               f"delete the folder and download it again") from None
    if not isinstance(out, dict):
        raise CompetitionError(f"{path} holds a {type(out).__name__}, not a CIFAR batch dict; delete the folder and "
                               f"download it again")
    return out


# ---------------------------------------------------------------------------- imagefolder
def load_imagefolder(path, split: str = "train", cache_dir=None) -> ImageSet | None:
    """Images under `[split/]<class>/<image>` in a directory or a .tar/.tar.gz; classes sorted.

    Decoded arrays are cached as .npz in `cache_dir`, keyed by the source's path and the stat
    of every file it reads (_source_stamp), so the second load of CIFAR-10's 50,000 JPEGs takes
    a second instead of ~20.
    """
    path = Path(path)
    if not path.exists():
        raise CompetitionError(f"{path} does not exist: give a folder or .tar.gz of <class>/<image> files")
    cache = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{path.resolve()}|{_source_stamp(path)}|{split}".encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"{path.name.split('.')[0]}-{split}-{key}.npz"
        if cache.exists():
            try:
                with np.load(cache, allow_pickle=False) as z:
                    return ImageSet(z["images"], z["labels"], [str(c) for c in z["classes"]])
            except Exception as e:  # a cut or damaged cache is rebuilt, never a dead end
                print(f"note: the image cache {cache} is damaged ({type(e).__name__}); decoding {path} again",
                      file=sys.stderr)
                cache.unlink(missing_ok=True)
    entries = list(_iter_image_files(path))  # (relative parts, bytes loader)
    if not entries:
        raise CompetitionError(f"{path}: no image files found (expected [split/]<class>/<image>.jpg)")
    entries = _select_split(entries, split, path)
    if entries is None:
        return None
    classes = sorted({parts[-2] for parts, _ in entries})
    class_index = {c: i for i, c in enumerate(classes)}
    images, labels = [], []
    for parts, data in entries:
        images.append(_decode(data, "/".join(parts), path))
        labels.append(class_index[parts[-2]])
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise CompetitionError(f"{path}: images have different sizes {sorted(shapes)[:3]}...; every image of "
                               f"a data set must have one size: resize them first (e.g. PIL's Image.resize) "
                               f"and point --data at the resized copy")
    result = ImageSet(np.stack(images), np.asarray(labels, np.int64), classes)
    if cache is not None:
        with atomic_path(cache, ".npz") as tmp:
            np.savez(tmp, images=result.images, labels=result.labels, classes=np.asarray(classes))
    return result


def _source_stamp(path: Path) -> str:
    """What the cache key changes with: the archive's, or every image file's (a file added to
    train/cat/ leaves the top folder's mtime alone), path, size, mtime, ctime and inode.

    Not a hash of the contents: reading 50,000 small JPEGs adds ~1 s to the ~1.5 s of listing and
    stat-ing them (measured on 2 cores), and their first and last bytes (JFIF header, end marker)
    are nearly the same in every file anyway. The assumption instead: the filesystem keeps ctime,
    which no program sets (utime sets only atime and mtime; writing a file, `touch -d`, `cp -p` or
    `tar -x` restoring an old mtime, a rename over it all move ctime to now), so an image changed in
    place with its size and mtime put back still changes the key; the inode catches a file replaced
    by another. On a mount that does not keep ctime the key is size + mtime, as before."""
    def stamp(st: os.stat_result) -> str:
        return f"{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"

    if not path.is_dir():
        return stamp(path.stat())
    h = hashlib.sha1()
    for p in sorted(path.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            h.update(f"{p.relative_to(path)}|{stamp(p.stat())}\n".encode())
    return h.hexdigest()


def _iter_image_files(path: Path):
    if path.is_dir():
        for p in _folder_images(path):
            yield p.relative_to(path).parts, p.read_bytes()
        return
    data_end = check_archive_complete(path)
    refused: dict[str, list[str]] = {}
    seen: set[tuple] = set()
    try:
        # Streaming mode ("r|*") reads the archive once, front to back: no index of 50k members.
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                if Path(m.name).suffix.lower() not in IMAGE_SUFFIXES or m.isdir():
                    continue
                parts = tuple(p for p in PurePosixPath(m.name).parts if p not in (".", ""))
                # `tar -r` of an updated file appends a second member of the same path: both would be
                # read, the old image beside the new one (tar -x keeps only the last)
                why = _refused_member(m) or ("paths held twice" if parts in seen else None)
                seen.add(parts)
                if why:
                    refused.setdefault(why, []).append(m.name)
                    continue
                yield parts, tar.extractfile(m).read()
            end = tar.offset  # where the first end-of-archive block starts
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CompetitionError(f"{path} is not a readable folder or .tar/.tar.gz archive ({e})") from None
    if refused:
        # The whole archive is refused, not just these members: dropping them would train on part
        # of the data set without a word, and following a link could read any file on this
        # machine. load_imagefolder lists every member before it decodes one, so nothing was used.
        raise CompetitionError(
            f"{path}: {_refusals(refused, 'image member(s)')}: an image archive holds each image once, as a plain "
            f"file at a relative <class>/<image> path; recreate it from the image files themselves (tar -h "
            f"--hard-dereference stores what links point at), then rerun (nothing was read from it)")
    if data_end > end:
        # tarfile stops at the first end-of-archive block, and its gzip reader at the first gzip
        # member: `cat a.tar.gz b.tar.gz` trained on a.tar.gz's classes alone without a word.
        raise CompetitionError(
            f"{path} holds {data_end - end} bytes of data after its tar end-of-archive (archives joined with cat, or "
            f"a gzip of several members?), which a tar reader never reads: recreate one archive from the image files "
            f"themselves (tar czf all.tar.gz train/), then rerun (nothing was read from it)")


def _refusals(refused: dict[str, list[str]], what: str) -> str:
    """'N <what> refused (k1 why1, e.g. 'name'; ...)': how many members or files were refused and
    why (the one wording of an archive's and a folder's refusals)."""
    kinds = "; ".join(f"{len(names)} {why}, e.g. {names[0]!r}" for why, names in refused.items())
    return f"{sum(map(len, refused.values()))} {what} refused ({kinds})"


def _folder_images(path: Path) -> list[Path]:
    """The image files of a folder, sorted, once none is refused: the folder's images are its own
    plain files, as an archive's must be (_refused_member). A link out of the folder could read
    any file on this machine into the data set; a pipe blocks the reader forever; a linked folder
    is never entered (rglob), so its images would be left out without a word."""
    root, files, refused = path.resolve(), [], {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink() and p.is_dir():
            refused.setdefault("links to folders", []).append(p)
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.is_dir():
            continue
        why = None
        if p.is_symlink() and not p.resolve().is_relative_to(root):
            why = "links to files outside the folder"
        elif not p.exists():
            why = "links to missing files"
        elif not stat.S_ISREG(p.stat().st_mode):
            why = "devices or pipes"
        if why:
            refused.setdefault(why, []).append(p)
        else:
            files.append(p)
    if refused:
        shown = {why: [str(p.relative_to(path)) for p in ps] for why, ps in refused.items()}
        raise CompetitionError(
            f"{path}: {_refusals(shown, 'image file(s)')}: an image folder holds its images as its own plain files; "
            f"copy what the links point at into it (cp -rL FOLDER COPY makes such a copy) and point --data at that, "
            f"then rerun (nothing was read from it)")
    return files


def _refused_member(m: tarfile.TarInfo) -> str | None:
    """Why an image-named archive member is not read, or None: a link (its target could be any file
    here, or another member the one-pass reader has gone past), a device or pipe, or a name that
    would land outside the folder it was unpacked into (absolute, or through `..`)."""
    name = PurePosixPath(m.name)
    if m.issym() or m.islnk():
        return "links"
    if not m.isfile():
        return "devices or pipes"
    if name.is_absolute() or ".." in name.parts:
        return "paths outside the archive's folder"
    return None


def check_archive_complete(path: Path) -> None:
    """Refuse an archive that was cut short. tarfile's stream mode takes a header block cut in
    the middle for the end of the archive and stops without a word (one cut of CIFAR-10's tarball
    trained on 33,772 of 50,000 images), so the whole stream is read first: the compression must
    reach its end marker, and the tar must end with its two zero blocks. Returns where the
    uncompressed stream's last non-zero byte ends (_iter_image_files: no data may follow the
    tar's end-of-archive)."""
    import bz2
    import gzip
    import lzma
    import zlib

    with open(path, "rb") as f:
        magic = f.read(6)
    opener = gzip.open if magic[:2] == b"\x1f\x8b" else bz2.open if magic[:3] == b"BZh" else \
        lzma.open if magic[:6] == b"\xfd7zXZ\x00" else open
    total, tail, data_end = 0, b"", 0
    try:
        with opener(path, "rb") as f:  # gzip.open reads every member of a concatenated stream
            while chunk := f.read(1 << 22):
                used = len(chunk.rstrip(b"\0"))
                data_end = total + used if used else data_end
                total, tail = total + len(chunk), (tail + chunk)[-1024:]
    except (EOFError, OSError, lzma.LZMAError, zlib.error) as e:
        raise CompetitionError(f"{path} is cut short or damaged ({type(e).__name__}: {e}); download or copy it "
                               f"again (nothing was read from it)") from None
    if total % 512 or tail != bytes(1024):
        raise CompetitionError(f"{path} ends without the tar end-of-archive blocks ({total} bytes): it was cut "
                               f"short; download or copy it again (nothing was read from it)")
    return data_end


def _select_split(entries, split: str, path: Path):
    """Keep `split/<class>/<image>` entries when the tree has split folders; a tree of bare
    `<class>/<image>` is all 'train'."""
    if any(len(parts) < 2 for parts, _ in entries):
        bad = next("/".join(p) for p, _ in entries if len(p) < 2)
        raise CompetitionError(f"{path}: {bad} is not inside a class folder (expected <class>/<image>)")
    has_split = all(len(parts) >= 3 for parts, _ in entries)
    if not has_split:
        return entries if split == "train" else None
    chosen = [(parts, d) for parts, d in entries if parts[-3] == split]
    return chosen or None


def _decode(data: bytes, name: str, source: Path) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            # Grayscale, palette and RGBA images become RGB (alpha dropped), as torchvision's ImageFolder
            # loader does: a mixed folder is normal, and its size is still checked against the others.
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise CompetitionError(f"{source}: cannot decode {name} ({e}); remove or replace that file") from None


# ---------------------------------------------------------------------------- OOD files
def ood_name(i: int) -> str:
    return f"distortion{i:02d}.npy"


def ood_files(ood_dir, expected: int | None = OOD_FILES, download: bool = False) -> list[Path]:
    """The validated list of `distortionNN.npy` files in `ood_dir`, numbered 00.. with no gaps.

    `expected` files are required (19 for the competition; None accepts any count >= 1).
    With download=True, missing files are fetched from the public repository first.
    """
    ood_dir = Path(ood_dir)
    if download and expected is not None:
        missing = [ood_name(i) for i in range(expected) if not (ood_dir / ood_name(i)).exists()]
        for name in missing:
            _download_ood(ood_dir, name)
    if not ood_dir.is_dir():
        raise CompetitionError(f"OOD directory {ood_dir} does not exist: put distortion00.npy .. distortion18.npy "
                               f"there (from DL4DS/ood-test-files, ood-test/) or pass --download")
    found = sorted(p for p in ood_dir.glob("distortion*.npy") if re.fullmatch(r"distortion\d{2}\.npy", p.name))
    count = expected if expected is not None else len(found)
    want = [ood_dir / ood_name(i) for i in range(count)]
    missing = [p.name for p in want if not p.exists()]
    if missing or not want:
        raise CompetitionError(f"{ood_dir}: missing {', '.join(missing) or 'all distortionNN.npy files'}; "
                               f"expected distortion00.npy .. {ood_name(max(count - 1, 0))}")
    return want


def open_ood(path, image_shape: tuple[int, int] | None = (32, 32)) -> np.ndarray:
    """Memory-map one OOD file after checking it: uint8, (5*N, H, W, 3), readable to the end.

    Memory-mapped so that predicting 19 x 50,000 images never holds more than a batch.
    """
    path = Path(path)
    check_npy(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CompetitionError(f"{path} is missing") from None
    except Exception as e:  # a truncated file fails here: mmap cannot cover the declared shape
        raise CompetitionError(f"{path} is not a readable .npy file ({type(e).__name__}: {e}); "
                               f"it is probably truncated: download it again") from None
    if arr.dtype != np.uint8:
        raise CompetitionError(f"{path}: dtype {arr.dtype}, expected uint8 images")
    if arr.ndim != 4 or arr.shape[-1] != 3 or (image_shape and arr.shape[1:3] != tuple(image_shape)):
        want = f"(5*N, {image_shape[0]}, {image_shape[1]}, 3)" if image_shape else "(5*N, H, W, 3)"
        raise CompetitionError(f"{path}: shape {arr.shape}, expected {want}")
    if arr.shape[0] == 0 or arr.shape[0] % SEVERITIES:
        raise CompetitionError(f"{path}: {arr.shape[0]} rows is not a positive multiple of {SEVERITIES} severities")
    return arr


def check_regular(path) -> None:
    """Refuse a path that is there but is not a regular file, before anything opens it: opening a
    named pipe blocks until something writes into it (a FIFO sent as distortion05.npy hung
    predict), and a device is read without end. A link to a regular file is one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # the caller's own "missing" message
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device")
        raise CompetitionError(f"{path} is {kind}, not a regular file (nothing was read from it): replace it with "
                               f"the file itself")


def check_npy(path) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of a .npy file, from its header, once the file holds exactly that array: np.load
    reads the declared bytes and ignores whatever follows, so two files joined (or a download with
    something appended) would pass for the first; a cut one is refused here as well."""
    from numpy.lib import format as npy

    path = Path(path)
    check_regular(path)
    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = npy.read_magic(f)
            if version not in readers:
                raise ValueError(f"format version {version[0]}.{version[1]}, which np.save writes only for "
                                 f"structured arrays")
            shape, _, dtype = readers[version](f)
            offset, size = f.tell(), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise CompetitionError(f"{path} is missing") from None
    except (ValueError, OSError, EOFError) as e:
        raise CompetitionError(f"{path} is not a readable .npy file ({type(e).__name__}: {e}); it is probably "
                               f"truncated: download or rebuild it") from None
    if dtype.hasobject:
        raise CompetitionError(f"{path} is not a readable .npy file: it holds Python objects (a pickle, refused "
                               f"unread), not numbers")
    want = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < want:
        raise CompetitionError(f"{path} is truncated: {size} bytes, but its header declares a {dtype} array of "
                               f"shape {shape} ({want} bytes): download or rebuild it")
    if size > want:
        raise CompetitionError(f"{path} holds {size - want} bytes after the {dtype} array of shape {shape} its "
                               f"header declares (two files joined, or something appended?), which np.load would "
                               f"ignore: download or rebuild it (nothing was read from it)")
    return shape, dtype


COMPETITION_SHAPE = (OOD_FILES, SEVERITIES * 10_000)  # 19 files of 50,000 rows (5 severities x 10,000 images)


class OodSet:
    """A folder of OOD files, checked: the competition's `distortionNN.npy` or a labelled local
    suite made by `python -m competition.score suite` (which adds corruptions.json, labels.npy
    and suite.json). Every stage that reads OOD files (predict, ensemble, score, submit) opens
    the folder through this class, so they all agree on which files and rows there are.

    Checked always: files numbered 00.. without gaps, as many as a suite's corruptions.json
    names (no more, no fewer), every file the same number of rows (5 x N). `shape` = (files,
    rows per file) is also required when given: COMPETITION_SHAPE for the real CIFAR-100 test set."""

    def __init__(self, path, shape: tuple[int, int] | None = None):
        self.path, self.shape = Path(path), shape
        if not self.path.is_dir():
            raise CompetitionError(f"OOD directory {self.path} does not exist: put distortion00.npy .. "
                                   f"distortion18.npy there (from DL4DS/ood-test-files, ood-test/) or pass --download")
        found = sorted(int(p.name[10:12]) for p in self.path.glob("distortion*.npy")
                       if re.fullmatch(r"distortion\d{2}\.npy", p.name))
        names = self.info()["names"] if self.is_suite else {}
        count = shape[0] if shape else len(names) or (max(found) + 1 if found else 0)
        missing = [ood_name(i) for i in range(count) if i not in found]
        extra = [ood_name(i) for i in found if i >= count]
        why = (f"the competition has {count}" if shape else f"its corruptions.json names {count}" if names
               else f"numbered 00..{count - 1:02d}")
        if missing or extra or not count:
            raise CompetitionError(
                f"{self.path}: {'missing ' + ', '.join(missing) if missing else ''}"
                f"{'; ' if missing and extra else ''}{'unexpected ' + ', '.join(extra) if extra else ''}"
                f"{'no distortionNN.npy files' if not count else ''} ({why} files); a submission needs every "
                f"file and only those: restore or remove files, or rebuild the suite")
        self.files = [self.path / ood_name(i) for i in range(count)]
        shapes = [open_ood(p, image_shape=None).shape for p in self.files]
        self.rows, sizes = [x[0] for x in shapes], {x[1:3] for x in shapes}
        if len(sizes) > 1:  # one file of another size would be resized silently into the submission
            common = max(sizes, key=[x[1:3] for x in shapes].count)
            odd = [f"{p.name} ({x[1]}x{x[2]})" for p, x in zip(self.files, shapes) if x[1:3] != common]
            raise CompetitionError(f"{self.path}: {', '.join(odd)} images, but the other files hold "
                                   f"{common[0]}x{common[1]}: every OOD file holds the same images; the odd file is "
                                   f"from another set (download or rebuild it)")
        self.image_size = next(iter(sizes))
        if len(set(self.rows)) > 1:
            common = max(set(self.rows), key=self.rows.count)
            odd = [f"{p.name} ({r})" for p, r in zip(self.files, self.rows) if r != common]
            raise CompetitionError(f"{self.path}: {', '.join(odd)} rows, but the other files have {common}: every "
                                   f"OOD file holds the same images at 5 severities; the odd file is truncated "
                                   f"or from another set (download or rebuild it)")
        if shape and self.rows[0] != shape[1]:
            raise CompetitionError(f"{self.path}: {self.rows[0]} rows per file, but the competition's files have "
                                   f"{shape[1]}: these are not the real test files (pass --allow-partial to use a "
                                   f"partial copy on purpose)")

    @property
    def is_suite(self) -> bool:
        """A local suite (it holds corruptions.json), not the competition's files."""
        return (self.path / "corruptions.json").exists()

    @staticmethod
    def required_shape(path, datasets, allow_partial: bool = False) -> tuple[int, int] | None:
        """COMPETITION_SHAPE when runs trained on cifar100 predict real (not local-suite) OOD files:
        a partial or foreign copy of the test set would give a submission Kaggle rejects."""
        if allow_partial or "cifar100" not in set(datasets) or (Path(path) / "corruptions.json").exists():
            return None
        return COMPETITION_SHAPE

    @property
    def labels(self) -> np.ndarray | None:
        """The suite's N labels (the same images at every severity of every file), or None."""
        p = self.path / "labels.npy"
        if not p.exists():
            return None
        check_npy(p)
        try:
            labels = np.load(p, allow_pickle=False)
        except Exception as e:
            raise CompetitionError(f"{p} is not a readable .npy ({type(e).__name__}); rebuild the suite") from None
        n = self.rows[0] // SEVERITIES
        if labels.shape != (n,) or labels.dtype.kind not in "iu" or (n and labels.min() < 0):
            raise CompetitionError(f"{p}: {labels.dtype} labels of shape {labels.shape}; a suite of {n} images per "
                                   f"severity needs {n} class indices >= 0 (rebuild it with score suite)")
        return labels

    def info(self) -> dict:
        """suite.json (where the images came from) plus the corruption name of every file."""
        def read(name):
            # Missing: the competition's files, or a suite made before suite.json; unreadable: refused,
            # since a cut or edited suite.json would otherwise be scored as "images of unknown origin".
            path = self.path / name
            check_regular(path)
            try:
                out = json.loads(path.read_text())
                why = None if isinstance(out, dict) else f"it holds a JSON {type(out).__name__}"
            except FileNotFoundError:
                return {}
            except (ValueError, UnicodeDecodeError) as e:
                why = f"{type(e).__name__}: {str(e)[:80]}"
            if why:
                raise CompetitionError(f"{path} is not the JSON object `score suite` writes ({why}): rebuild the "
                                       f"suite with python -m competition.score suite, or restore the file")
            return out

        return {**read("suite.json"), "names": _suite_names(read("corruptions.json").get("names", {}),
                                                             self.path / "corruptions.json")}

    def role(self) -> str:
        """Which of the three roles (train / choose / measure) this folder's labelled images play,
        in one line every report prints next to a figure made on them."""
        return suite_role(self.info()) if self.labels is not None else "unlabelled (no local figure)"

    def images(self, k: int) -> np.ndarray:
        """File k, memory-mapped."""
        return open_ood(self.files[k], image_shape=None)


def _suite_names(names, path: Path) -> dict:
    """corruptions.json's "names", checked: {"distortion00.npy": corruption name, ...} for files 00.. in
    order, as make_suite writes it (OodSet counts the files by it, and reports name them)."""
    ok = isinstance(names, dict) and list(names) == [ood_name(i) for i in range(len(names))] and \
        all(isinstance(v, str) for v in names.values())
    if not ok:
        what = (f"a JSON {type(names).__name__}" if not isinstance(names, dict) else
                f"keys {', '.join(list(map(str, names))[:3])}..." if names else "no names")
        raise CompetitionError(f"{path}: \"names\" is {what}, not the object `score suite` writes "
                               f"({{\"distortion00.npy\": \"gaussian_noise\", ...}} for every file in order): "
                               f"rebuild the suite with python -m competition.score suite, or restore the file")
    return names


def fingerprint(array: np.ndarray) -> str:
    """sha1 of an array's dtype, shape and bytes (about 0.2 s for CIFAR's 150 MB): which images a
    suite was made from, and which a run trained on, so other images behind the same path are noticed."""
    h = hashlib.sha1(f"{array.dtype}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def data_id(ds) -> str:
    """A short fingerprint of a data set's images and labels (fingerprint of each)."""
    return fingerprint(ds.images)[:16] + fingerprint(ds.labels)[:8]


# The competition's OOD files are CIFAR-100's test split, corrupted: that split's labels are the
# leaderboard's answers, so nothing may be chosen on it and no local figure may rest on it.
LEADERBOARD_SPLIT = ("cifar100", "test")


def suite_role(info: dict) -> str:
    """The role of a local suite's images, from its suite.json (score suite writes it)."""
    split, n = info.get("split"), info.get("n", "?")
    if (info.get("dataset"), split) == LEADERBOARD_SPLIT or info.get("leaderboard_labels"):
        return (f"LEADERBOARD LABELS: {n} images of CIFAR-100's test split, the images of the competition's OOD "
                f"files; not an estimate, and any choice made on it tunes on the leaderboard's answers")
    if split == "measure":
        return (f"measure: {n} images of the training split's measure reserve; no member trained on them and no "
                f"choice saw them")
    if split == "test":
        return f"measure: {n} images of the {info.get('dataset')} test split; no member trained on them, no choice saw them"
    if split == "train":
        return (f"choose, not measure: {n} images of fold {info.get('fold')} of the training split, the choose "
                f"images of runs that hold it out (best epoch and weights picked on corrupted copies of that fold) "
                f"and training images of runs that train on it: not an estimate; measure on a measure reserve "
                f"(folds --measure-n)")
    return "images of unknown origin (no suite.json): neither a measure nor an estimate"


def sample_rows(rows, n: int | None, seed: int) -> np.ndarray:
    """A seeded random subset of `n` of `rows` (an array, or a count meaning arange(count)),
    sorted; all of them when n is falsy or not smaller. The same rows, n and seed always give
    the same subset (training subsets, evaluation checks and the local suite all use this)."""
    rows = np.arange(rows) if np.isscalar(rows) else np.asarray(rows)
    if not n or n >= len(rows):
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, n, replace=False))


def sample_balanced(labels, n: int, seed: int) -> np.ndarray:
    """A seeded subset of n rows holding every class of `labels` equally (n / classes each),
    sorted: a local suite that mirrors the competition's files, whose every severity is CIFAR-100's
    test split (100 images per class). Each class's rows are drawn as sample_rows draws."""
    labels = np.asarray(labels)
    classes = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=classes)
    per = n // classes
    if n % classes or per < 1:
        raise CompetitionError(f"--balanced --n {n}: must be a multiple of the {classes} classes (e.g. {classes * max(per, 1)})")
    if counts.min() < per:
        raise CompetitionError(f"--balanced --n {n} needs {per} images of every class, but class {counts.argmin()} "
                               f"has {counts.min()} here: lower --n to at most {classes * counts.min()}")
    return np.sort(np.concatenate([sample_rows(np.flatnonzero(labels == c), per, seed + c) for c in range(classes)]))


def check_rows(path, rows, n: int, fix: str) -> np.ndarray:
    """The rows an index file names in an array of `n` (images, labels), checked: whole numbers in
    0..n-1. numpy takes -1 for the last row (another image and label, without a word) and fails only
    past n, half-way through the work; `fix` says what to do about it."""
    rows = np.asarray(rows)
    if rows.dtype.kind not in "iu":
        raise CompetitionError(f"{path} holds {rows.dtype} values, not row numbers: {fix}")
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        bad = rows.min() if rows.min() < 0 else rows.max()
        raise CompetitionError(f"{path} names row {bad}, but the rows it indexes are 0..{n - 1}: {fix}")
    return rows


def check_pseudo(path, images: np.ndarray, probs: np.ndarray, image_shape: tuple, n_classes: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A pseudo-label file's images and soft targets (what competition.selftrain writes: uint8
    images of the data set's size, and each image's class probabilities), checked where training
    reads them, naming the file: appended to the uint8 training images, a float copy turned the
    whole set float and failed far away (corrupted_copies, input_stats) or trained on garbage."""
    images, probs = np.asarray(images), np.asarray(probs)
    what = "a pseudo-label file written by competition.selftrain"
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise CompetitionError(f"{path}: images are {images.dtype} {images.shape}, but {what} holds uint8 images of "
                               f"this data set's shape (N, {', '.join(map(str, image_shape))}) (a converted copy?): "
                               f"rerun competition.selftrain to write it again")
    if probs.dtype.kind != "f" or probs.shape != (len(images), n_classes):
        raise CompetitionError(f"{path}: probs are {probs.dtype} {probs.shape}, but {what} holds one row of "
                               f"{n_classes} class probabilities per image ({len(images)}, {n_classes}): rerun "
                               f"competition.selftrain to write it again")
    if not np.isfinite(probs).all() or probs.min(initial=0) < 0 or \
            not np.allclose(probs.sum(1, dtype=np.float64), 1, atol=1e-3):
        raise CompetitionError(f"{path}: probs are not probabilities (each row >= 0, finite, summing to 1): rerun "
                               f"competition.selftrain to write it again")
    return images, probs.astype(np.float32)


def _download_ood(ood_dir: Path, name: str) -> None:
    url = OOD_URL.format(name=name)
    try:
        with atomic_path(ood_dir / name, ".npy") as tmp:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
            if Path(tmp).read_bytes()[:6] != b"\x93NUMPY":  # an LFS pointer or an HTML error page
                raise OSError("the response is not a .npy file")
    except Exception as e:
        raise CompetitionError(f"could not download {url} into {ood_dir} ({e}). Offline? Copy the 19 "
                               f"distortionNN.npy files of DL4DS/ood-test-files (ood-test/) there.") from None
