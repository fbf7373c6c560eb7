"""The data-split stage against its oracles.

Oracles: torchvision's own ``CIFAR10`` / ``FashionMNIST`` readers with ``ToTensor`` + ``Normalize``,
run on small files written here in the real formats (CIFAR-10 python pickles, idx with magic
2051/2049 and big-endian sizes); scipy's Gaussian densities for the gmm posterior. No test reaches
the network: sockets are refused and torchvision's download functions are replaced.
"""

import gzip
import hashlib
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torchvision import transforms
from torchvision.datasets import CIFAR10, FashionMNIST
from torchvision.datasets import utils as tv_utils
from torchvision.datasets.mnist import read_image_file, read_label_file

from pipeline import data
from pipeline.config import CIFAR10_CLASSES, FASHION_CLASSES, DatasetConfig
from pipeline.data import DataError, GaussianMixture, load_split, read_cifar_batches

CIFAR_TRAIN_PER_CLASS = 2  # images of each class in each of the 5 training batches
FASHION_TRAIN_PER_CLASS = 8
TEST_PER_CLASS = 3
GMM_N_TRAIN, GMM_N_TEST = 40, 30


# --------------------------------------------------------------------------------------------
# Files in the real formats


def pattern(ident: int, size: int) -> np.ndarray:
    """A known uint8 image: bytes 0-1 encode its id, the rest a ramp that differs per image."""
    row = ((ident * 37 + np.arange(size) * 11) % 256).astype(np.uint8)
    row[0], row[1] = ident % 256, ident // 256
    return row


def ident(row: torch.Tensor) -> int:
    """The id of a normalized image row, read back from its first two pixels."""
    lo, hi = ((row[:2].double() + 1) / 2 * 255).round().long().tolist()
    return lo + 256 * hi


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar_layout() -> list[tuple[str, list[int], list[int]]]:
    """(file, image ids, labels) of each CIFAR fixture batch; every class in every batch."""
    layout, next_id = [], 0
    batches = [(f"data_batch_{b}", CIFAR_TRAIN_PER_CLASS) for b in range(1, 6)]
    for name, per_class in [*batches, ("test_batch", TEST_PER_CLASS)]:
        labels = [c for _ in range(per_class) for c in range(10)]
        layout.append((name, list(range(next_id, next_id + len(labels))), labels))
        next_id += len(labels)
    return layout


def write_cifar(folder: Path, bytes_keys: bool = False) -> None:
    """data_batch_1..5, test_batch and batches.meta as CIFAR-10's python version has them.

    Like the originals these are dicts of data (uint8 [n, 3072], CHW rows), labels, batch_label and
    filenames, pickled with protocol 2 (unpickled with encoding="latin1" the keys are str).
    """
    folder.mkdir(parents=True)
    for name, ids, labels in cifar_layout():
        entry = {
            "batch_label": name,
            "labels": labels,
            "data": np.stack([pattern(i, 3072) for i in ids]),
            "filenames": [f"img_{i}.png" for i in ids],
        }
        if bytes_keys:
            entry = {k.encode(): v for k, v in entry.items()}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {
        "num_cases_per_batch": 10 * CIFAR_TRAIN_PER_CLASS,
        "label_names": list(CIFAR10_CLASSES),
        "num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def use_cifar_md5s(monkeypatch, folder: Path) -> None:
    """Point the stage's (filename, md5) lists at the fixture files, with their true MD5s."""
    for attr, names in (
        ("CIFAR_TRAIN_FILES", [f"data_batch_{b}" for b in range(1, 6)]),
        ("CIFAR_TEST_FILES", ["test_batch"]),
    ):
        monkeypatch.setattr(data, attr, [(n, md5(folder / n)) for n in names])
    monkeypatch.setattr(data, "CIFAR_META_FILE", ("batches.meta", md5(folder / "batches.meta")))


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    return struct.pack(f">{array.ndim + 1}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def fashion_files() -> tuple[dict[str, bytes], dict[int, int]]:
    """The four Fashion-MNIST idx files (decompressed) and {image id: label}."""
    files, labels_of, next_id = {}, {}, 10_000
    for prefix, per_class in (("train", FASHION_TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
        labels = np.array([c for _ in range(per_class) for c in range(10)])
        ids = range(next_id, next_id + len(labels))
        labels_of.update(zip(ids, labels.tolist(), strict=True))
        next_id += len(labels)
        images = np.stack([pattern(i, 784).reshape(28, 28) for i in ids])
        files[f"{prefix}-images-idx3-ubyte"] = idx_bytes(images)
        files[f"{prefix}-labels-idx1-ubyte"] = idx_bytes(labels)
    return files, labels_of


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, no real Debian folder, and a record of any download attempt."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    for target, name in ((socket.socket, "connect"), (socket, "create_connection"), (socket, "getaddrinfo")):
        monkeypatch.setattr(target, name, refuse)
    calls = []

    def no_download(*args, **kwargs):
        calls.append(args)
        raise URLError("offline (test)")

    for name in ("download_url", "download_and_extract_archive"):
        monkeypatch.setattr(tv_utils, name, no_download)
    monkeypatch.setattr(FashionMNIST, "download", no_download)
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "no-debian")
    return calls


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A data root holding the CIFAR-10 fixture and the decompressed Fashion-MNIST fixture."""
    root = tmp_path / "data"
    write_cifar(root / "cifar-10-batches-py")
    use_cifar_md5s(monkeypatch, root / "cifar-10-batches-py")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, blob in fashion_files()[0].items():
        (raw / name).write_bytes(blob)
    return root


def cfg(source, root=".", **kw) -> DatasetConfig:
    kw.setdefault("classes", {"cifar2": ("cat", "ship"), "fashion2": ("Pullover", "Bag")}.get(source, ()))
    kw.setdefault("download", False)
    return DatasetConfig(source=source, root=str(root), n_train=GMM_N_TRAIN, n_test=GMM_N_TEST, **kw)


def parts(split):
    return (split.x_train, split.y_train, split.x_val, split.y_val, split.x_test, split.y_test)


def pool_rows(split) -> list[tuple[bytes, int]]:
    x, y = torch.cat([split.x_train, split.x_val]), torch.cat([split.y_train, split.y_val])
    return sorted((row.numpy().tobytes(), int(label)) for row, label in zip(x, y, strict=True))


# --------------------------------------------------------------------------------------------
# The split, for every source

POOL = {"cifar2": 2 * 5 * CIFAR_TRAIN_PER_CLASS, "fashion2": 2 * FASHION_TRAIN_PER_CLASS, "gmm": GMM_N_TRAIN}
TEST = {"cifar2": 2 * TEST_PER_CLASS, "fashion2": 2 * TEST_PER_CLASS, "gmm": GMM_N_TEST}
SOURCES = pytest.mark.parametrize("source", ["cifar2", "fashion2", "gmm"])


@SOURCES
@pytest.mark.parametrize("val_fraction", [0.25, 0.5])
def test_split_sizes_disjoint_and_covering(root, source, val_fraction):
    split = load_split(cfg(source, root, val_fraction=val_fraction))
    n_val = round(val_fraction * POOL[source])
    assert split.sizes == {"train": POOL[source] - n_val, "val": n_val, "test": TEST[source]}
    assert split.input_dim == {"cifar2": 3072, "fashion2": 784, "gmm": 2}[source]
    for x, y in zip(parts(split)[::2], parts(split)[1::2], strict=True):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(x) == len(y)
        assert set(y.tolist()) <= {0, 1}
    rows = pool_rows(split)
    assert len({r for r, _ in rows}) == POOL[source]  # train and val share no row
    # the same pool however it is split: another seed (files) or another fraction (gmm draws per seed)
    other = load_split(cfg(source, root, val_fraction=0.5 if val_fraction != 0.5 else 0.25))
    assert pool_rows(other) == rows
    if source != "gmm":
        assert pool_rows(load_split(cfg(source, root, val_fraction=val_fraction, seed=7))) == rows


@SOURCES
def test_split_is_deterministic_and_seeded(root, source):
    a, b, c = (load_split(cfg(source, root, seed=s)) for s in (3, 3, 4))
    assert all(torch.equal(p, q) for p, q in zip(parts(a), parts(b), strict=True))
    assert a.split_hash == b.split_hash and len(a.split_hash) == 16
    assert not torch.equal(a.x_train, c.x_train)
    assert a.split_hash != c.split_hash


@SOURCES
def test_label_zero_is_the_first_class(root, source):
    ds = cfg(source, root)
    forward = load_split(ds)
    backward = load_split(cfg(source, root, classes=ds.classes[::-1] or ("class 1", "class 0")))
    assert forward.classes == (ds.classes or ("class 0", "class 1"))
    assert backward.classes == forward.classes[::-1]
    assert forward.split_hash != backward.split_hash
    if source == "gmm":  # the ground truth swaps with the labels
        x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(backward.ground_truth.posterior(x), 1 - forward.ground_truth.posterior(x))
        return
    # same pool, same permutation: identical images, flipped labels
    assert torch.equal(forward.x_train, backward.x_train)
    assert torch.equal(forward.y_train, 1 - backward.y_train)
    known = CIFAR10_CLASSES if source == "cifar2" else FASHION_CLASSES
    true_labels = (
        fashion_files()[1]
        if source == "fashion2"
        else {i: c for _, ids, labels in cifar_layout() for i, c in zip(ids, labels, strict=True)}
    )
    for x, y in ((forward.x_train, forward.y_train), (forward.x_test, forward.y_test)):
        names = {known[true_labels[ident(row)]] for row, label in zip(x, y, strict=True) if label == 0}
        assert names == {ds.classes[0]}


def test_split_hash_changes_with_a_changed_file(root, monkeypatch):
    before = {s: load_split(cfg(s, root)).split_hash for s in ("cifar2", "fashion2")}
    # one pixel of one "cat" image in data_batch_3 (with the MD5 list updated, as a new release would)
    folder = root / "cifar-10-batches-py"
    entry = pickle.loads((folder / "data_batch_3").read_bytes(), encoding="latin1")
    entry["data"][CIFAR10_CLASSES.index("cat"), 100] ^= 1
    (folder / "data_batch_3").write_bytes(pickle.dumps(entry, protocol=2))
    use_cifar_md5s(monkeypatch, folder)
    # one pixel of the first "Bag" training image in the decompressed idx file
    images = root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    blob = bytearray(images.read_bytes())
    blob[16 + 784 * FASHION_CLASSES.index("Bag") + 500] ^= 1
    images.write_bytes(bytes(blob))
    for source, old in before.items():
        assert load_split(cfg(source, root)).split_hash != old


# --------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar2_matches_torchvision(root):
    """Every image equals torchvision's CIFAR10 item through ToTensor + Normalize(0.5, 0.5), flattened."""

    class Oracle(CIFAR10):  # torchvision's reader, with the fixture's own (true) MD5s
        train_list = [list(f) for f in data.CIFAR_TRAIN_FILES]
        test_list = [list(f) for f in data.CIFAR_TEST_FILES]
        meta = {"filename": "batches.meta", "key": "label_names", "md5": data.CIFAR_META_FILE[1]}

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    cat, ship = CIFAR10_CLASSES.index("cat"), CIFAR10_CLASSES.index("ship")
    split = load_split(cfg("cifar2", root))

    def expected(train):
        items = [(img.flatten(), t) for img, t in Oracle(str(root), train=train, transform=to_tensor)]
        return [(x, int(t == ship)) for x, t in items if t in (cat, ship)]

    test = expected(train=False)
    assert torch.equal(split.x_test, torch.stack([x for x, _ in test]))  # bit for bit, file order
    assert split.y_test.tolist() == [y for _, y in test]
    pool = {ident(x): (x, y) for x, y in expected(train=True)}
    seen = []
    for x, y in ((split.x_train, split.y_train), (split.x_val, split.y_val)):
        for row, label in zip(x, y, strict=True):
            seen.append(ident(row))
            assert torch.equal(row, pool[ident(row)][0]) and int(label) == pool[ident(row)][1]
    assert sorted(seen) == sorted(pool)
    # and by hand: x = v / 255 * 2 - 1, CHW order (the green plane starts at 1024)
    row, raw = split.x_test[0], pattern(ident(split.x_test[0]), 3072)
    for p in (5, 1024 + 33, 2048 + 1000):
        assert row[p].item() == pytest.approx(raw[p] / 255 * 2 - 1, abs=1e-6)


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_read_cifar_batches(tmp_path, bytes_keys):
    write_cifar(tmp_path / "b", bytes_keys=bytes_keys)
    name, ids, labels = cifar_layout()[2]
    rows, targets = read_cifar_batches(tmp_path / "b", [(name, md5(tmp_path / "b" / name))])
    assert rows.dtype == torch.uint8 and rows.shape == (len(ids), 3072)
    assert np.array_equal(rows.numpy(), np.stack([pattern(i, 3072) for i in ids]))
    assert targets.tolist() == labels


UNPICKLED = []


def _record_unpickle():
    UNPICKLED.append(True)
    return {"data": None}


class Booby:
    """Unpickling this calls _record_unpickle: it shows whether a file was unpickled."""

    def __reduce__(self):
        return (_record_unpickle, ())


def test_md5_mismatch_is_refused_before_unpickling(root):
    folder = root / "cifar-10-batches-py"
    (folder / "data_batch_2").write_bytes(pickle.dumps(Booby()))  # the MD5 list still has the old one
    with pytest.raises(DataError, match=r"data_batch_2: MD5 mismatch.*delete it") as info:
        load_split(cfg("cifar2", root))
    assert str(folder / "data_batch_2") in str(info.value)
    assert UNPICKLED == []
    truncated = (folder / "test_batch").read_bytes()[:1000]  # a download cut short
    (folder / "test_batch").write_bytes(truncated)
    with pytest.raises(DataError, match="test_batch: MD5 mismatch"):
        read_cifar_batches(folder, data.CIFAR_TEST_FILES)


def test_batch_without_data_is_a_data_error(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"labels": [1, 2]}, protocol=2))
    with pytest.raises(DataError, match="data_batch_1: not a CIFAR-10 python batch"):
        read_cifar_batches(tmp_path, [("data_batch_1", md5(tmp_path / "data_batch_1"))])


@pytest.mark.parametrize("download", [False, True])
def test_missing_cifar_says_where_to_put_it(tmp_path, offline, download):
    with pytest.raises(DataError) as info:
        load_split(cfg("cifar2", tmp_path / "empty", download=download))
    message = str(info.value)
    for hint in (
        f"CIFAR-10 not found under {tmp_path / 'empty'}",
        "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar.html",
        "make demo",
        "studies/fashion2.toml",
    ):
        assert hint in message
    assert len(offline) == (1 if download else 0)  # tried (and failed, offline) only when allowed


def test_cifar_archive_is_checked_and_extracted(root, tmp_path, monkeypatch):
    expected = load_split(cfg("cifar2", root)).split_hash
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    archive = fresh / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(data, "CIFAR_ARCHIVE_MD5", hashlib.md5(b"another archive").hexdigest())
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: MD5 mismatch"):
        load_split(cfg("cifar2", fresh))
    assert not (fresh / "cifar-10-batches-py").exists()
    monkeypatch.setattr(data, "CIFAR_ARCHIVE_MD5", md5(archive))
    assert load_split(cfg("cifar2", fresh)).split_hash == expected
    assert sorted(p.name for p in fresh.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar_archive_of_another_layout_leaves_nothing_behind(root, tmp_path, monkeypatch):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    archive = fresh / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # the binary version's folder name, not the python one
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-bin")
    monkeypatch.setattr(data, "CIFAR_ARCHIVE_MD5", md5(archive))
    with pytest.raises(DataError, match="has no cifar-10-batches-py/ folder; is it the python version"):
        load_split(cfg("cifar2", fresh))
    assert sorted(p.name for p in fresh.iterdir()) == ["cifar-10-python.tar.gz"]  # no temporaries


def test_cifar_constants_are_torchvisions():
    """The folder and MD5 lists written out in pipeline.data are torchvision's CIFAR10 ones."""
    assert CIFAR10.base_folder == data.CIFAR_FOLDER
    assert [tuple(f) for f in CIFAR10.train_list] == data.CIFAR_TRAIN_FILES
    assert [tuple(f) for f in CIFAR10.test_list] == data.CIFAR_TEST_FILES
    assert (CIFAR10.meta["filename"], CIFAR10.meta["md5"]) == data.CIFAR_META_FILE
    assert CIFAR10.tgz_md5 == data.CIFAR_ARCHIVE_MD5


def test_reading_data_does_not_import_torchvision():
    """torchvision (with the torch._dynamo and sympy it imports) is only for downloads."""
    code = (
        "import sys\nfrom pipeline.config import DatasetConfig\nfrom pipeline.data import load_split\n"
        "load_split(DatasetConfig(source='gmm'))\n"
        "print(sorted(m for m in ('torchvision', 'sympy', 'torch._dynamo') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_idx_files_read_as_torchvision_reads_them(root):
    """The images and labels of the split are the rows torchvision's idx readers give, bit for bit."""
    raw = root / "FashionMNIST" / "raw"
    ids = (FASHION_CLASSES.index("Pullover"), FASHION_CLASSES.index("Bag"))
    split = load_split(cfg("fashion2", root))
    images = read_image_file(str(raw / "t10k-images-idx3-ubyte"))
    labels = read_label_file(str(raw / "t10k-labels-idx1-ubyte"))
    keep = (labels == ids[0]) | (labels == ids[1])
    assert labels.dtype == torch.int64 and images.dtype == torch.uint8
    expected = images[keep].reshape(int(keep.sum()), -1).float().div(255).sub(0.5).div(0.5)
    assert torch.equal(split.x_test, expected)
    assert torch.equal(split.y_test, (labels[keep] == ids[1]).long())


def test_fashion2_matches_torchvision(root):
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    pullover, bag = FASHION_CLASSES.index("Pullover"), FASHION_CLASSES.index("Bag")
    split = load_split(cfg("fashion2", root))

    def expected(train):
        items = FashionMNIST(str(root), train=train, transform=to_tensor, download=False)
        return [(img.flatten(), int(t == bag)) for img, t in items if t in (pullover, bag)]

    test = expected(train=False)
    assert torch.equal(split.x_test, torch.stack([x for x, _ in test]))
    assert split.y_test.tolist() == [y for _, y in test]
    pool = {ident(x): (x, y) for x, y in expected(train=True)}
    x, y = torch.cat([split.x_train, split.x_val]), torch.cat([split.y_train, split.y_val])
    assert sorted(ident(row) for row in x) == sorted(pool)
    for row, label in zip(x, y, strict=True):
        assert torch.equal(row, pool[ident(row)][0]) and int(label) == pool[ident(row)][1]


def test_debian_gz_files_are_decompressed_into_root(root, tmp_path, monkeypatch):
    expected = load_split(cfg("fashion2", root)).split_hash
    debian = tmp_path / "debian"
    debian.mkdir()
    files = fashion_files()[0]
    for name, blob in files.items():
        (debian / f"{name}.gz").write_bytes(gzip.compress(blob, mtime=0))
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", debian)
    fresh = tmp_path / "fresh"
    assert load_split(cfg("fashion2", fresh)).split_hash == expected
    raw = fresh / "FashionMNIST" / "raw"
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == files  # and no temporary file left


def test_garbled_debian_gz_is_a_data_error(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    debian.mkdir()
    for name, blob in fashion_files()[0].items():
        (debian / f"{name}.gz").write_bytes(
            gzip.compress(blob)[:-30] if "t10k-images" in name else gzip.compress(blob)
        )
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", debian)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: cannot decompress"):
        load_split(cfg("fashion2", tmp_path / "fresh"))
    assert not (tmp_path / "fresh" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").exists()
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "fresh" / "FashionMNIST" / "raw").iterdir())


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("train-images-idx3-ubyte", lambda b: b[:-100]),  # truncated
        ("t10k-labels-idx1-ubyte", lambda b: b[:-1]),
        ("train-labels-idx1-ubyte", lambda b: struct.pack(">I", 2051) + b[4:]),  # wrong magic
        ("t10k-images-idx3-ubyte", lambda b: b[:6]),  # header cut
    ],
)
def test_damaged_idx_is_a_data_error(root, name, damage):
    path = root / "FashionMNIST" / "raw" / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=f"{name}: truncated or not an idx file"):
        load_split(cfg("fashion2", root))


@pytest.mark.parametrize("download", [False, True])
def test_missing_fashion_says_how_to_install_it(tmp_path, offline, download):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_split(cfg("fashion2", tmp_path / "empty", download=download))
    assert len(offline) == (1 if download else 0)


@pytest.mark.skipif(not data.DEBIAN_FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", Path("/usr/share/datasets/fashion-mnist"))
    split = load_split(cfg("fashion2", tmp_path, classes=("T-shirt/top", "Shirt"), val_fraction=0.2))
    assert split.sizes == {"train": 9600, "val": 2400, "test": 2000}
    assert split.y_test.sum() == 1000 and split.y_train.sum() + split.y_val.sum() == 6000
    assert split.x_train.min() == -1 and split.x_train.max() == 1


# --------------------------------------------------------------------------------------------
# The gmm ground truth


def test_gmm_sample_shapes_balance_and_moments():
    gmm = GaussianMixture()
    x, y = gmm.sample(200_000, torch.Generator().manual_seed(0))
    assert x.shape == (200_000, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.unique().tolist()) == {0, 1}
    assert abs(y.double().mean().item() - 0.5) < 0.005  # equal priors (5 standard errors)
    for c in (0, 1):  # class mean = mean of its means; variance = std^2 + spread of the means
        means = torch.tensor(data.GMM_MEANS[c], dtype=torch.float64)
        xc = x[y == c].double()
        torch.testing.assert_close(xc.mean(0), means.mean(0), atol=0.01, rtol=0)
        torch.testing.assert_close(xc.var(0), data.GMM_STD**2 + means.var(0, correction=0), atol=0.01, rtol=0)


def test_gmm_sampling_is_seeded():
    gmm = GaussianMixture()
    a, b, c = (gmm.sample(1000, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_gmm_posterior_matches_scipy_densities():
    gmm = GaussianMixture()
    grid = torch.cartesian_prod(torch.linspace(-2, 3, 21), torch.linspace(-1.5, 2, 15)).double()
    cov = data.GMM_STD**2 * np.eye(2)
    density = [
        np.mean([multivariate_normal(m, cov).pdf(grid.numpy()) for m in data.GMM_MEANS[c]], axis=0)
        for c in (0, 1)
    ]
    expected = density[1] / (density[0] + density[1])  # equal priors
    np.testing.assert_allclose(gmm.posterior(grid).numpy(), expected, rtol=1e-9, atol=1e-12)
    assert expected.min() < 0.05 and expected.max() > 0.95  # the grid spans both classes


def test_gmm_bayes_error_is_as_documented():
    gmm = GaussianMixture()
    estimate = gmm.bayes_error()
    assert 0.10 < estimate < 0.15
    assert estimate == pytest.approx(data.GMM_BAYES_ERROR, abs=0.001)
    # independently: the Bayes rule's error rate on fresh labelled points (std. error 0.0007)
    x, y = gmm.sample(200_000, torch.Generator().manual_seed(5))
    error = ((gmm.posterior(x) > 0.5).long() != y).double().mean().item()
    assert error == pytest.approx(data.GMM_BAYES_ERROR, abs=0.004)
    # the boundary is curved: the best linear rule does clearly worse (least-squares fit)
    features = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(features, y.double() * 2 - 1).solution
    assert ((features @ w > 0).long() != y).double().mean().item() > estimate + 0.03


def test_gmm_split_is_unnormalized_ground_truth_draws(root):
    split = load_split(cfg("gmm", root, seed=2))
    assert isinstance(split.ground_truth, GaussianMixture) and split.classes == ("class 0", "class 1")
    assert split.source == "gmm"
    big = load_split(DatasetConfig(source="gmm", n_train=20_000, n_test=20_000, seed=2))
    assert abs(big.x_test[:, 0].mean().item() - 0.5) < 0.05  # raw coordinates, centre of the means
    assert not torch.equal(big.x_test[:100], big.x_train[:100])  # pool and test: different streams
