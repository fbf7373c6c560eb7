"""Data-split stage: one two-class problem as in-memory tensors, split by a seeded permutation.

Three sources behind ``load_split``: ``cifar2`` (two CIFAR-10 classes, read from torchvision's
python batches after an MD5 check), ``fashion2`` (two Fashion-MNIST classes, from idx files; Debian's
``dataset-fashion-mnist`` package works offline) and ``gmm`` (a synthetic 2-D ground truth whose
Bayes error is known, so the bounds stage can draw as many fresh test sets as it likes).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import shutil
import struct
import tarfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipeline import files
from pipeline.config import CLASSES, DEFAULT_CLASSES, DatasetConfig
from pipeline.errors import UsageError
from pipeline.seeds import derive_seed

# Where Debian's dataset-fashion-mnist package puts the four idx .gz files (read-only).
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# Fashion-MNIST idx files as torchvision names them under <root>/FashionMNIST/raw/.
FASHION_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# CIFAR-10's folder and (filename, md5) lists as torchvision's CIFAR10 has them (tests/test_data.py
# checks they agree), written out so that reading data never imports torchvision: it brings in
# torch._dynamo and sympy, about 160 MB resident. Tests point the lists at their own files.
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = [
    ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
    ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
    ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
    ("data_batch_4", "634d18415352ddfa80567beed471001a"),
    ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
]
CIFAR_TEST_FILES = [("test_batch", "40351d587109b95175f43aff81a1287e")]
CIFAR_META_FILE = ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")
CIFAR_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
# Class pair used when a DatasetConfig was built in code without classes (parsing fills them in).

# The gmm ground truth: per class, three isotropic Gaussians with equal weight, laid out on two
# interleaved half-circles ("two moons"), so the Bayes boundary is an S-shaped curve. Equal priors.
GMM_MEANS = (
    ((-1.0, 0.0), (0.0, 1.0), (1.0, 0.0)),  # class 0: upper arc of the unit circle around (0, 0)
    ((0.0, 0.5), (1.0, -0.5), (2.0, 0.5)),  # class 1: lower arc of the unit circle around (1, 0.5)
)
GMM_STD = 0.25  # standard deviation of every component, per coordinate
GMM_BAYES_ERROR = 0.1177  # 0.5 * integral of min(p0, p1), by quadrature on a 0.002 grid


class DataError(UsageError, RuntimeError):
    """Data that cannot be read as it is on disk; the message names the file or folder and the fix."""


class GaussianMixture:
    """Two classes, each an equal-weight mixture of isotropic Gaussians in 2-D, equal class priors."""

    def __init__(self, means: torch.Tensor | tuple = GMM_MEANS, std: float = GMM_STD) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)  # [2 classes, K components, 2]
        self.std = float(std)
        if self.means.ndim != 3 or self.means.shape[0] != 2 or self.means.shape[2] != 2:
            raise ValueError(f"means must have shape [2, K, 2], got {tuple(self.means.shape)}")
        self._flat_means = self.means.reshape(-1, 2).to(torch.float32)  # component c = class c // K

    def __repr__(self) -> str:
        return f"GaussianMixture(means={self.means.tolist()}, std={self.std})"

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` i.i.d. labelled points: x float32 [n, 2], y int64 [n] (vectorized: 20M in about 1 s)."""
        k = self.means.shape[1]
        component = torch.randint(0, 2 * k, (n,), generator=generator)  # class = component // k
        x = torch.randn(n, 2, generator=generator).mul_(self.std)
        x += self._flat_means[component]
        return x, component.div_(k, rounding_mode="floor")

    def posterior(self, x: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
        """Exact p(y=1 | x) as float64 [n]: Bayes' rule on the two mixture densities."""
        out = []
        for part in torch.as_tensor(x, dtype=torch.float64).reshape(-1, 2).split(chunk):
            # log N(x; mu, std^2 I) up to a constant shared by every component (same std)
            log_dens = -((part[:, None, None, :] - self.means) ** 2).sum(-1) / (2 * self.std**2)
            log_class = torch.logsumexp(log_dens, dim=-1)  # [n, 2]; equal weights and priors cancel
            out.append(torch.sigmoid(log_class[:, 1] - log_class[:, 0]))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)

    def bayes_error(self, n: int = 1_000_000, generator: torch.Generator | None = None) -> float:
        """Monte Carlo estimate of E[min(p, 1 - p)] (std. error about 1e-4 at the default n)."""
        generator = generator or torch.Generator().manual_seed(0)
        eta = self.posterior(self.sample(n, generator)[0])
        return torch.minimum(eta, 1 - eta).mean().item()


@dataclass(frozen=True, eq=False)
class Split:
    """One train/validation/test split held in memory; label 0 is ``classes[0]``."""

    x_train: torch.Tensor  # float32 [n, d], flattened
    y_train: torch.Tensor  # int64 [n], in {0, 1}
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, str]
    source: str
    split_hash: str  # changes when the data or the split changes
    ground_truth: GaussianMixture | None = None  # gmm only

    @property
    def input_dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: torch.device | str) -> Split:
        """A copy with the six tensors on ``device`` (this one unchanged). The hash stays: it is the
        data's, and the ground truth keeps sampling on the CPU, where its generators are."""
        tensors = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
        return replace(self, **{name: getattr(self, name).to(device) for name in tensors})


def class_names(source: str) -> tuple[str, ...]:
    """Every class name of a source, in the dataset's own label order."""
    return CLASSES[source]


def load_split(ds: DatasetConfig) -> Split:
    """Read (or draw) the data of ``ds.source``, keep ``ds.classes`` and split by ``ds.seed``."""
    if ds.source not in CLASSES:
        raise DataError(f"dataset.source = {ds.source!r}: must be one of {sorted(CLASSES)}")
    classes = tuple(ds.classes) or DEFAULT_CLASSES[ds.source]
    known = class_names(ds.source)
    if len(classes) != 2 or classes[0] == classes[1] or not set(classes) <= set(known):
        raise DataError(f"dataset.classes = {list(classes)}: give two different names from {list(known)}")
    ids = tuple(known.index(c) for c in classes)
    root = Path(ds.root)
    if ds.source != "gmm" and root.exists() and not root.is_dir():
        raise DataError(f"dataset.root = {ds.root!r} is a file, not a folder: give the folder the data is in")
    ground_truth = None
    if ds.source == "cifar2":
        folder = _cifar_folder(root, ds.download)
        names = _read_verified_pickle(folder / CIFAR_META_FILE[0], CIFAR_META_FILE[1]).get("label_names")
        if list(names or ()) != list(known):
            raise DataError(f"{folder / CIFAR_META_FILE[0]}: label_names {names} are not CIFAR-10's")
        pool = _two_classes(*read_cifar_batches(folder, CIFAR_TRAIN_FILES), ids)
        test = _two_classes(*read_cifar_batches(folder, CIFAR_TEST_FILES), ids)
    elif ds.source == "fashion2":
        raw = _fashion_raw(root, ds.download)
        pool = _two_classes(*_read_fashion(raw, train=True), ids)
        test = _two_classes(*_read_fashion(raw, train=False), ids)
    else:
        ground_truth = GaussianMixture(torch.as_tensor(GMM_MEANS, dtype=torch.float64)[list(ids)])
        pool = ground_truth.sample(ds.n_train, _stream(ds.seed, "pool"))
        test = ground_truth.sample(ds.n_test, _stream(ds.seed, "test"))
    return _split(ds, classes, pool, test, ground_truth)


def _stream(seed: int, name: str) -> torch.Generator:
    """An independent generator per purpose, derived from the one study seed."""
    return torch.Generator().manual_seed(derive_seed(seed, name))


def _two_classes(data: torch.Tensor, labels: torch.Tensor, ids: tuple[int, int]):
    """Rows of the two classes (file order), normalized like ToTensor + Normalize(0.5, 0.5)."""
    keep = (labels == ids[0]) | (labels == ids[1])
    x = data[keep].reshape(int(keep.sum()), -1).to(torch.float32)
    x.div_(255).sub_(0.5).div_(0.5)  # the same float ops as torchvision, so the values match bit for bit
    return x, (labels[keep] == ids[1]).long()


def _split(ds: DatasetConfig, classes, pool, test, ground_truth) -> Split:
    (x, y), (x_test, y_test) = pool, test
    n = len(y)
    n_val = min(max(round(ds.val_fraction * n), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(ds.seed))
    val, train = perm[:n_val], perm[n_val:]
    parts = (x[train], y[train], x[val], y[val], x_test.contiguous(), y_test.contiguous())
    h = hashlib.sha256(json.dumps([ds.source, list(classes)]).encode())
    for t in (train, val, *parts):  # indices plus the actual bytes of all three parts
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy())
    return Split(
        *parts, classes=classes, source=ds.source, split_hash=h.hexdigest()[:16], ground_truth=ground_truth
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10

_CIFAR_MISSING = (
    "CIFAR-10 not found under {root}: put cifar-10-python.tar.gz (from "
    "https://www.cs.toronto.edu/~kriz/cifar.html) in {root}/, or try `make demo` / "
    "studies/fashion2.toml which run offline"
)


def _cifar_folder(root: Path, download: bool) -> Path:
    """``<root>/cifar-10-batches-py``, extracted from the archive (downloaded if allowed) when missing."""
    folder = root / CIFAR_FOLDER
    if folder.is_dir():
        return folder
    from torchvision.datasets import CIFAR10  # lazy: start-up and memory; only the archive needs it
    from torchvision.datasets import utils as tv_utils  # lazy: as above

    archive = root / CIFAR10.filename
    if not archive.is_file():
        if not download:
            raise DataError(_CIFAR_MISSING.format(root=root) + " (download = false)")
        try:
            tv_utils.download_url(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR_ARCHIVE_MD5)
        except (OSError, RuntimeError) as exc:
            raise DataError(_CIFAR_MISSING.format(root=root) + f" (download failed: {exc})") from exc
    if not tv_utils.check_integrity(archive, CIFAR_ARCHIVE_MD5):
        raise DataError(f"{archive}: MD5 mismatch (corrupt or truncated): delete it and download it again")
    # all or nothing: the batches land in a temporary folder renamed into place, never half a folder
    with tarfile.open(archive, "r:gz") as tar, files.atomic_dir(folder) as tmp:
        members = [m for m in tar.getmembers() if m.name.startswith(f"{CIFAR_FOLDER}/")]
        if not members:
            raise DataError(f"{archive}: has no {CIFAR_FOLDER}/ folder; is it the python version?")
        for member in members:
            member.name = member.name[len(CIFAR_FOLDER) + 1 :]
        tar.extractall(tmp, members=[m for m in members if m.name], filter="data")
    return folder


def _read_verified_pickle(path: Path, md5: str) -> dict:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc}); delete {path.parent} and extract it again") from exc
    if hashlib.md5(blob, usedforsecurity=False).hexdigest() != md5:
        raise DataError(
            f"{path}: MD5 mismatch (expected {md5}), the file is corrupt or truncated; delete it "
            f"(or the whole {path.parent.name}/ folder) and download / extract CIFAR-10 again"
        )
    entry = pickle.loads(blob, encoding="latin1")  # noqa: S301 -- only after its MD5 matched
    if not isinstance(entry, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (a {type(entry).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def read_cifar_batches(folder: Path, files: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate CIFAR python batches after checking each file's MD5 (before unpickling it).

    Returns uint8 [N, 3072] (each row 3 x 32 x 32 in CHW order, as stored) and int64 [N] labels.
    """
    data, labels = [], []
    for name, md5 in files:
        entry = _read_verified_pickle(Path(folder) / name, md5)
        rows = entry.get("data")
        targets = entry.get("labels", entry.get("fine_labels"))  # the keys torchvision reads
        if (
            not isinstance(rows, np.ndarray)
            or rows.dtype != np.uint8
            or targets is None
            or rows.size != len(targets) * 3072
        ):
            raise DataError(
                f"{Path(folder) / name}: not a CIFAR-10 python batch (data/labels missing or "
                "mismatched); delete it and extract CIFAR-10 again"
            )
        data.append(torch.from_numpy(rows.reshape(-1, 3072)))
        labels.append(torch.as_tensor(targets, dtype=torch.int64))
    return torch.cat(data), torch.cat(labels)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


def _fashion_raw(root: Path, download: bool) -> Path:
    """``<root>/FashionMNIST/raw`` with the four idx files: found, decompressed from Debian, or downloaded."""
    raw = root / "FashionMNIST" / "raw"
    missing = [name for pair in FASHION_FILES.values() for name in pair if not (raw / name).is_file()]
    for name in list(missing):
        if (DEBIAN_FASHION_DIR / f"{name}.gz").is_file():
            _gunzip(DEBIAN_FASHION_DIR / f"{name}.gz", raw / name)
            missing.remove(name)
    if missing and not download:
        raise DataError(
            f"Fashion-MNIST not found: {raw}/ lacks {', '.join(missing)} and {DEBIAN_FASHION_DIR}/ has no "
            "copy; run `apt-get install dataset-fashion-mnist` or set download = true"
        )
    if missing:
        from torchvision.datasets import FashionMNIST  # lazy: start-up and memory; only a download needs it

        try:
            FashionMNIST(str(root), train=True, download=True)
        except (OSError, RuntimeError) as exc:
            raise DataError(
                f"Fashion-MNIST not found under {raw}/ and the download failed ({exc}); "
                "run `apt-get install dataset-fashion-mnist`"
            ) from exc
    return raw


def _gunzip(src: Path, dest: Path) -> None:
    """Decompress to a temporary name, then rename: a crash never leaves half an idx file."""
    try:
        with gzip.open(src, "rb") as fin:
            files.atomic_write(dest, lambda fout: shutil.copyfileobj(fin, fout, 1 << 20))
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{src}: cannot decompress ({exc}); reinstall dataset-fashion-mnist") from exc


def _read_idx(path: Path, images: bool) -> torch.Tensor:
    """One idx file (uint8 images [N, 28, 28] or int64 labels [N]), header and length checked first.

    The values torchvision's ``read_image_file`` / ``read_label_file`` give (tests/test_data.py
    compares them), read straight into one array: no copy of the file, no torchvision import.
    """
    magic, ndim = (2051, 3) if images else (2049, 1)  # 0x08: unsigned bytes, then the dimension count
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4 * (ndim + 1))
            found = struct.unpack(f">{ndim + 1}I", head) if len(head) == 4 * (ndim + 1) else (None,)
            expected = 4 * (ndim + 1) + int(np.prod(found[1:], dtype=np.int64)) if found[0] == magic else -1
            if size != expected:
                raise DataError(
                    f"{path}: truncated or not an idx file (magic {magic}, {size} bytes); delete it "
                    f"and rerun (it is restored from {DEBIAN_FASHION_DIR} or downloaded)"
                )
            values = np.fromfile(f, dtype=np.uint8, count=expected - len(head)).reshape(found[1:])
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    tensor = torch.from_numpy(values)
    return tensor if images else tensor.long()


def _read_fashion(raw: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images_name, labels_name = FASHION_FILES[train]
    images, labels = _read_idx(raw / images_name, images=True), _read_idx(raw / labels_name, images=False)
    if len(images) != len(labels) or images.shape[1:] != (28, 28) or bool((labels > 9).any()):
        raise DataError(
            f"{raw}: {images_name} ({tuple(images.shape)}) and {labels_name} "
            f"({len(labels)} labels) do not match; delete both and rerun"
        )
    return images, labels
