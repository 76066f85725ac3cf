"""Data sources and OOD files, on tiny data written by the tests in the real formats:
CIFAR-100's python pickles, a class-folder tree (plain and .tar.gz), the embedded digits,
and distortionNN.npy files. Every bad input must give a CompetitionError naming the file.
No network: download=False throughout."""
import io
import pickle
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from competition import data
from competition.files import CompetitionError


# ---------------------------------------------------------------------------- cifar100
def write_cifar100(root, n_train=6, n_test=4, seed=0):
    """A tiny cifar-100-python/ in the official pickle layout: rows are R plane, G plane,
    B plane (1024 bytes each, row-major), so a row reshapes to (3, 32, 32)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        chw = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        fine = [int(x) for x in rng.integers(0, 3, size=n)]
        batch = {b"data": chw.reshape(n, 3072), b"fine_labels": fine,
                 b"coarse_labels": [f // 2 for f in fine],
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                 b"batch_label": f"{split} batch".encode()}
        with open(d / split, "wb") as f:
            pickle.dump(batch, f)
        out[split] = (chw.transpose(0, 2, 3, 1), np.array(fine))
    meta = {b"fine_label_names": [b"apple", b"bear", b"cloud"], b"coarse_label_names": [b"fruit", b"other"]}
    with open(d / "meta", "wb") as f:
        pickle.dump(meta, f)
    return out


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_pickles_load_as_hwc(tmp_path, split):
    want_images, want_labels = write_cifar100(tmp_path)[split]
    ds = data.load("cifar100", split, tmp_path, download=False)
    assert ds.images.dtype == np.uint8 and ds.images.shape == (len(want_labels), 32, 32, 3)
    np.testing.assert_array_equal(ds.images, want_images)
    # Spot-check the transposition by hand: pixel (y=5, x=7) of image 1, green channel.
    raw = pickle.load(open(tmp_path / "cifar-100-python" / split, "rb"))[b"data"]
    assert ds.images[1, 5, 7, 1] == raw[1, 1024 + 5 * 32 + 7]
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.labels, want_labels)
    assert ds.classes == ["apple", "bear", "cloud"]


def test_cifar10_batches_load_in_order(tmp_path):
    """cifar-10-batches-py/: data_batch_1..5 concatenated in order, labels under b"labels"."""
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    want = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        chw = rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, 2)]
        with open(d / name, "wb") as f:
            pickle.dump({b"data": chw.reshape(2, 3072), b"labels": labels}, f)
        want.append((chw.transpose(0, 2, 3, 1), labels))
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    ds = data.load("cifar10", "train", tmp_path, download=False)
    np.testing.assert_array_equal(ds.images, np.concatenate([w[0] for w in want[:5]]))
    assert ds.labels.tolist() == sum((w[1] for w in want[:5]), []) and ds.classes[3] == "c3"
    assert data.load("cifar10", "test", tmp_path, download=False).labels.tolist() == want[5][1]
    (d / "data_batch_3").unlink()
    with pytest.raises(CompetitionError, match="cifar-10-batches-py is incomplete"):
        data.load("cifar10", "train", tmp_path, download=False)


def test_cifar100_absent_offline_names_the_directory(tmp_path):
    with pytest.raises(CompetitionError, match="cifar-100-python") as e:
        data.load("cifar100", "train", tmp_path / "nowhere", download=False)
    assert str(tmp_path / "nowhere") in str(e.value)


def test_cifar100_missing_meta_and_bad_pickle(tmp_path):
    write_cifar100(tmp_path)
    root = tmp_path / "cifar-100-python"
    (root / "test").write_bytes(b"not a pickle")
    with pytest.raises(CompetitionError, match=re.escape(str(root / "test"))):
        data.load("cifar100", "test", tmp_path, download=False)
    (root / "meta").unlink()
    with pytest.raises(CompetitionError, match=re.escape(str(root / "meta"))):
        data.load("cifar100", "train", tmp_path, download=False)


def test_cifar100_unknown_split(tmp_path):
    with pytest.raises(CompetitionError, match="valid"):
        data.load("cifar100", "valid", tmp_path, download=False)


# ---------------------------------------------------------------------------- imagefolder
CLASSES = ["bird", "cat", "ant"]  # written unsorted; labels must follow sorted names


def write_tree(root, n_per_class=3, size=12, seed=0):
    """train/<class>/<n>.png|.jpg (one class JPEG) and a test/ split; returns the decoded
    images per split in file order (sorted paths), as the loader must see them."""
    rng = np.random.default_rng(seed)
    expect = {}
    for split in ("train", "test"):
        rows = []
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n_per_class):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                fmt, ext = ("JPEG", "jpg") if c == "cat" else ("PNG", "png")
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, fmt)
                (folder / f"{i}.{ext}").write_bytes(buf.getvalue())
                # JPEG is lossy: compare with what PIL decodes from the very bytes written.
                rows.append((f"{c}/{i}", np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))))
        (root / split / "cat" / "notes.txt").write_text("not an image; ignored")
        rows.sort(key=lambda r: r[0])
        expect[split] = (np.stack([r[1] for r in rows]),
                         np.array([sorted(CLASSES).index(r[0].split("/")[0]) for r in rows]))
    return expect


def make_targz(src, dest):
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=".")  # members named ./train/<class>/<image>, as `tar czf x.tgz .` writes
    return dest


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "pets"
    expect = write_tree(root)
    return root, make_targz(root, tmp_path / "pets.tar.gz"), expect


@pytest.mark.parametrize("split", ["train", "test"])
def test_imagefolder_dir_and_targz_agree(tmp_path, tree, split):
    root, archive, expect = tree
    want_images, want_labels = expect[split]
    got = {}
    for form, path in (("dir", root), ("tgz", archive)):
        ds = data.load("imagefolder", split, tmp_path / f"data-{form}", path=path)
        assert ds.images.dtype == np.uint8 and ds.images.shape == (9, 12, 12, 3)
        assert ds.classes == ["ant", "bird", "cat"]
        np.testing.assert_array_equal(ds.labels, want_labels)
        np.testing.assert_array_equal(ds.images, want_images)
        got[form] = ds
    np.testing.assert_array_equal(got["dir"].images, got["tgz"].images)


def test_imagefolder_without_split_folders_is_all_train(tmp_path):
    expect = write_tree(tmp_path / "t")
    ds = data.load_imagefolder(tmp_path / "t" / "train", "train")
    np.testing.assert_array_equal(ds.images, expect["train"][0])
    assert data.load_imagefolder(tmp_path / "t" / "train", "test") is None


@pytest.mark.parametrize("form", ["dir", "tgz"])
def test_imagefolder_cache_returns_identical_arrays(tmp_path, tree, form, monkeypatch):
    root, archive, _ = tree
    path = root if form == "dir" else archive
    first = data.load("imagefolder", "train", tmp_path / "d", path=path)
    assert len(list((tmp_path / "d" / "cache").glob("*.npz"))) == 1
    # The second load must come from the cache: make decoding impossible and load again.
    monkeypatch.setattr(data, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    second = data.load("imagefolder", "train", tmp_path / "d", path=path)
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert second.classes == first.classes and second.images.dtype == np.uint8


def test_imagefolder_cache_sees_a_new_image_in_a_class_folder(tmp_path, tree):
    # A file added two levels down does not touch the top folder's mtime; the cache key
    # must still change, or the second load silently trains on the old images.
    root, _, _ = tree
    assert len(data.load("imagefolder", "train", tmp_path / "d", path=root).labels) == 9
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "train" / "ant" / "9.png")
    ds = data.load("imagefolder", "train", tmp_path / "d", path=root)
    assert len(ds.labels) == 10 and (ds.labels == 0).sum() == 4


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("form", ["dir", "tgz"])
def test_imagefolder_corrupt_image_names_the_file(tmp_path, tree, form, damage):
    root, _, _ = tree
    bad = root / "train" / "bird" / "1.png"
    bad.write_bytes(b"this is not a png" if damage == "garbage" else bad.read_bytes()[:60])
    path = root if form == "dir" else make_targz(root, tmp_path / "damaged.tar.gz")
    with pytest.raises(CompetitionError, match="train/bird/1.png") as e:
        data.load("imagefolder", "train", tmp_path / "d", path=path)
    assert str(path) in str(e.value)
    assert not list((tmp_path / "d").rglob("*.npz")), "a failed load must not leave a cache"


def test_imagefolder_bad_sources(tmp_path):
    with pytest.raises(CompetitionError, match="--data"):
        data.load("imagefolder", "train", tmp_path)
    with pytest.raises(CompetitionError, match="missing.tar.gz"):
        data.load("imagefolder", "train", tmp_path, path=tmp_path / "missing.tar.gz")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(CompetitionError, match="junk.tar.gz"):
        data.load("imagefolder", "train", tmp_path, path=junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompetitionError, match="no image files"):
        data.load("imagefolder", "train", tmp_path, path=tmp_path / "empty")


def test_imagefolder_mixed_sizes_are_one_clear_error(tmp_path):
    for i, side in enumerate((8, 10)):
        (tmp_path / "t" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((side, side, 3), 7 * i, np.uint8)).save(tmp_path / "t" / "a" / f"{i}.png")
    # The message names the folder, the sizes, and a fix that exists (no option that is not there).
    with pytest.raises(CompetitionError, match=r"t: images have different sizes .*resize them first"):
        data.load_imagefolder(tmp_path / "t")


def test_unknown_source(tmp_path):
    with pytest.raises(CompetitionError, match="unknown dataset"):
        data.load("mnist", "train", tmp_path)


# ---------------------------------------------------------------------------- digits
def test_digits_shapes_classes_and_split():
    train, test = data.load("digits", "train"), data.load("digits", "test")
    for ds in (train, test):
        assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (32, 32, 3)
        assert ds.labels.dtype == np.int64 and ds.classes == [str(i) for i in range(10)]
        assert set(ds.labels.tolist()) == set(range(10))
    assert len(train.labels) + len(test.labels) == 1797  # scikit-learn's bundled digits
    assert abs(len(test.labels) / 1797 - 0.2) < 0.01
    # Disjoint: no test image is a train image (the 8x8 digits hold no exact duplicates).
    train_rows = {im.tobytes() for im in train.images}
    assert not any(im.tobytes() in train_rows for im in test.images)
    assert train.images.max() > 100  # not an all-black image set


def test_digits_deterministic_and_unknown_split():
    a, b = data.load("digits", "test"), data.load("digits", "test")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    with pytest.raises(CompetitionError, match="valid"):
        data.load("digits", "valid")


# ---------------------------------------------------------------------------- OOD files
def write_ood(d, rows=(10, 5, 15)):
    d.mkdir(exist_ok=True)
    for i, n in enumerate(rows):
        np.save(d / data.ood_name(i), np.full((n, 32, 32, 3), i, np.uint8))
    return d


@pytest.mark.parametrize("rows", [(5,), (10, 5, 15)])
def test_valid_ood_files_pass(tmp_path, rows):
    d = write_ood(tmp_path / "ood", rows)
    for expected in (len(rows), None):
        files = data.ood_files(d, expected=expected)
        assert [p.name for p in files] == [f"distortion{i:02d}.npy" for i in range(len(rows))]
    for i, (p, n) in enumerate(zip(files, rows)):
        arr = data.open_ood(p)
        assert arr.shape == (n, 32, 32, 3) and arr.dtype == np.uint8 and arr[0, 0, 0, 0] == i


def test_ood_missing_files_or_wrong_count(tmp_path):
    d = write_ood(tmp_path / "ood", (5, 5, 5))
    with pytest.raises(CompetitionError, match="distortion03.npy"):
        data.ood_files(d, expected=4)
    with pytest.raises(CompetitionError, match="distortion18.npy"):
        data.ood_files(d)  # the competition's 19
    (d / "distortion01.npy").unlink()  # a gap: 00 and 02 only
    with pytest.raises(CompetitionError, match="distortion01.npy"):
        data.ood_files(d, expected=None)
    with pytest.raises(CompetitionError, match=re.escape(str(tmp_path / "absent"))):
        data.ood_files(tmp_path / "absent", expected=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompetitionError, match="distortion00.npy"):
        data.ood_files(tmp_path / "empty", expected=None)
    with pytest.raises(CompetitionError, match="distortion07.npy"):
        data.open_ood(d / "distortion07.npy")


def _truncated(p):
    np.save(p, np.zeros((10, 32, 32, 3), np.uint8))
    p.write_bytes(p.read_bytes()[:5000])


def _header_only(p):
    np.save(p, np.zeros((10, 32, 32, 3), np.uint8))
    p.write_bytes(p.read_bytes()[:40])


BAD_OOD = {
    "truncated": (_truncated, "truncated"),
    "header cut": (_header_only, "not a readable"),
    "float32": (lambda p: np.save(p, np.zeros((10, 32, 32, 3), np.float32)), "float32"),
    "grey": (lambda p: np.save(p, np.zeros((10, 32, 32), np.uint8)), "shape"),
    "channels first": (lambda p: np.save(p, np.zeros((10, 3, 32, 32), np.uint8)), "shape"),
    "64x64": (lambda p: np.save(p, np.zeros((10, 64, 64, 3), np.uint8)), "shape"),
    "rows not 5*N": (lambda p: np.save(p, np.zeros((12, 32, 32, 3), np.uint8)), "multiple of 5"),
    "no rows": (lambda p: np.save(p, np.zeros((0, 32, 32, 3), np.uint8)), "multiple of 5"),
    "not npy": (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n"), "not a readable"),
    "pickled": (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "not a readable"),
}


@pytest.mark.parametrize("kind", BAD_OOD)
def test_bad_ood_file_names_the_file(tmp_path, kind):
    write_ood(tmp_path / "ood", (5, 5))
    bad = tmp_path / "ood" / "distortion01.npy"
    make, problem = BAD_OOD[kind]
    make(bad)
    files = data.ood_files(tmp_path / "ood", expected=2)  # names and count are fine...
    data.open_ood(files[0])
    with pytest.raises(CompetitionError, match=problem) as e:  # ...the content is not
        data.open_ood(files[1])
    assert str(bad) in str(e.value)


def test_open_ood_any_image_size_when_asked(tmp_path):
    np.save(tmp_path / "distortion00.npy", np.zeros((10, 64, 64, 3), np.uint8))
    assert data.open_ood(tmp_path / "distortion00.npy", image_shape=None).shape == (10, 64, 64, 3)


@pytest.mark.parametrize("compress", ["gz", ""])
def test_an_archive_cut_anywhere_is_refused_not_half_read(tree, tmp_path, compress):
    """tarfile's stream mode reads a cut inside a header block as the end of the archive; every
    cut point here (inside a header, inside image data, inside the end blocks) must be refused."""
    import gzip

    root, _, expect = tree
    whole = tmp_path / f"whole.tar{'.gz' if compress else ''}"
    with tarfile.open(whole, f"w:{compress}") as tar:
        tar.add(root, arcname=".")
    raw = gzip.decompress(whole.read_bytes()) if compress else whole.read_bytes()
    assert len(data.load("imagefolder", "train", tmp_path / "c0", path=whole).labels) == len(expect["train"][1])
    for cut in (512 * 3 + 100, 512 * 5, len(raw.rstrip(b"\0")) + 10, len(raw) // 2):
        bad = tmp_path / f"cut{cut}.tar{'.gz' if compress else ''}"
        bad.write_bytes(gzip.compress(raw[:cut]) if compress else raw[:cut])
        with pytest.raises(CompetitionError, match="cut short"):
            data.load("imagefolder", "train", tmp_path / f"c{cut}", path=bad)
    if compress:  # a damaged byte inside the compressed stream
        body = bytearray(whole.read_bytes())
        body[len(body) // 2] ^= 0xFF
        (tmp_path / "flipped.tar.gz").write_bytes(bytes(body))
        with pytest.raises(CompetitionError, match="flipped.tar.gz"):
            data.load("imagefolder", "train", tmp_path / "cf", path=tmp_path / "flipped.tar.gz")
    cut_gzip = tmp_path / "cutgz.tar.gz"
    cut_gzip.write_bytes(whole.read_bytes()[:-20])  # the gzip stream itself ends early
    if compress:
        with pytest.raises(CompetitionError, match="cut short or damaged"):
            data.load("imagefolder", "train", tmp_path / "cg", path=cut_gzip)


def test_a_damaged_cache_is_rebuilt(tree, tmp_path, capsys):
    root, targz, expect = tree
    first = data.load("imagefolder", "train", tmp_path / "cache", path=targz)
    (cache,) = (tmp_path / "cache").rglob("*.npz")
    cache.write_bytes(cache.read_bytes()[:100])
    again = data.load("imagefolder", "train", tmp_path / "cache", path=targz)
    assert np.array_equal(first.images, again.images) and "damaged" in capsys.readouterr().err
