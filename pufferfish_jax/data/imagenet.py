"""ImageNet (ILSVRC2012), or any ImageFolder tree, as a TensorFlow-free TFDS dataset, and the
grain input pipeline that decodes and augments it.

Preparation (once): :func:`build` writes ``array_record`` shards holding each image's original
encoded bytes (no re-encoding), its label and file name, from either

* the official archives in a manual dir: ``ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` per
  class inside) and ``ILSVRC2012_img_val.tar`` (50,000 JPEGs; labels from the list TFDS ships),
  read as streams with ``tarfile``; labels are the positions of the 1000 WordNet ids in sorted
  order, as TFDS's ``imagenet2012`` and torchvision's ImageFolder number them; or
* an ImageFolder tree: ``<root>/train/<class>/*.jpg`` and ``<root>/val/<class>/*.jpg`` (one
  subfolder per class; labels are the sorted class folder names of ``train``).

Reading: :func:`train_batches` / :func:`eval_batches` are random-access grain ``MapDataset``s of
this process's share of each global batch (as :mod:`pufferfish_jax.data.cifar`). Each batch reads
its records with one batched ``array_record`` lookup and decodes the JPEGs with Pillow on a pool
of threads (Pillow releases the GIL while decoding and resizing): random-resized-crop to 224 and
a horizontal flip for training, resize to 256 and a center crop of 224 for evaluation
(torchvision's transforms). Images travel as uint8; normalization happens on the accelerator.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import math
import os
import posixpath
import re
import tarfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from pufferfish_jax.data.cifar import _mix
from pufferfish_jax.data.tfds_common import DatasetError, manual_dir_of, prepare

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
# Sizes in TFDS's imagenet2012 checksums.tsv: a truncated download is refused before hours of work.
ARCHIVE_SIZES = {TRAIN_ARCHIVE: 147897477120, VAL_ARCHIVE: 6744924160}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLITS = ("train", "validation")
FOLDER_SPLITS = {"train": ("train",), "validation": ("val", "validation")}
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")
ARCHIVES_CONFIG = "ilsvrc2012"

IMAGE_SIZE = 224
CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults
CROP_RATIO = (3 / 4, 4 / 3)


def _tfds_text(name: str) -> list[str]:
    path = os.fspath(tfds.core.tfds_path(f"datasets/imagenet2012/{name}"))
    with open(path) as f:
        return f.read().strip().splitlines()


def official_wnids() -> list[str]:
    """The 1000 ILSVRC2012 WordNet ids in label order (sorted), from the list TFDS ships."""
    return _tfds_text("labels.txt")


def official_validation_wnids() -> list[str]:
    """The WordNet id of each of the 50,000 validation images, in file-number order."""
    return _tfds_text("validation_labels.txt")


@dataclasses.dataclass(eq=False)
class ImageNetConfig(tfds.core.BuilderConfig):
    """Where the images come from: the official archives (``folder`` None) or an ImageFolder root."""

    folder: str | None = None
    class_names: tuple[str, ...] = ()
    expected_sizes: dict[str, int] | None = None


def _image_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)
                  and os.path.isfile(os.path.join(folder, f)))


def _split_folder(root: str, split: str) -> str | None:
    for name in FOLDER_SPLITS[split]:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def folder_classes(root: str) -> tuple[str, ...]:
    """The class names of an ImageFolder tree (sorted subfolders of ``train``), validated."""
    if not os.path.isdir(root):
        raise DatasetError(f"image folder {root} does not exist")
    train, val = _split_folder(root, "train"), _split_folder(root, "validation")
    if train is None or val is None:
        raise DatasetError(f"image folder {root} needs the subfolders train/ and val/, each with one folder of images per class")
    classes = tuple(sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d))))
    if not classes:
        raise DatasetError(f"{train} holds no class folders")
    unknown = sorted(set(d for d in os.listdir(val) if os.path.isdir(os.path.join(val, d))) - set(classes))
    if unknown:
        raise DatasetError(f"{val} has classes that train/ lacks: {', '.join(unknown[:5])}")
    return classes


def folder_config_name(root: str, classes: Sequence[str]) -> str:
    """A config name per tree: its real path and class list, hashed."""
    key = "\n".join([os.path.realpath(root), *classes]).encode()
    return f"folder_{hashlib.sha256(key).hexdigest()[:12]}"


def _check_image(data: bytes, where: str) -> None:
    # Header only (size and format): a full decode of 1.28M images would double preparation time;
    # colour modes (CMYK, grayscale, a PNG named .JPEG) are handled when decoding.
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.size  # noqa: B018
    except Exception as e:
        raise DatasetError(f"{where} is not a readable image ({type(e).__name__})") from None


class PufferfishImageNet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """ImageNet / ImageFolder images as array_record: ``image`` (the encoded file), ``label``, ``file_name``."""

    name = "pufferfish_imagenet"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded images as in the source, labels by sorted class name."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {TRAIN_ARCHIVE} and {VAL_ARCHIVE} from image-net.org in the manual dir, "
        "or prepare an ImageFolder tree (train/<class>/*.jpg, val/<class>/*.jpg)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="ILSVRC2012 or an ImageFolder tree; images kept encoded, decoded by the input pipeline.",
            features=tfds.features.FeaturesDict({
                # The encoded file as it was (JPEG for ImageNet): decoding and augmentation happen
                # in the input pipeline, in numpy, never in TensorFlow.
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "label": tfds.features.ClassLabel(names=list(self.builder_config.class_names)),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://image-net.org/",
            # Records stay in source order (class by class); the pipeline shuffles.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        config = self.builder_config
        if config.folder is not None:
            return {split: self._generate_examples("folder", _split_folder(config.folder, split)) for split in SPLITS}
        manual = manual_dir_of(dl_manager)
        paths = {name: os.path.join(manual, name) if manual else None for name in (TRAIN_ARCHIVE, VAL_ARCHIVE)}
        missing = [name for name, path in paths.items() if path is None or not os.path.isfile(path)]
        if missing:
            where = manual or getattr(dl_manager, "_manual_dir", "")
            raise DatasetError(f"ImageNet not found: {' and '.join(missing)} missing from the manual dir {where}; "
                               "download them from image-net.org, or use an ImageFolder tree")
        for name, path in paths.items():
            size = os.path.getsize(path)
            expected = (config.expected_sizes or {}).get(name)
            if expected is not None and size != expected:
                raise DatasetError(f"{path} has {size} bytes but the official archive has {expected}, "
                                   "so it is truncated or not the ILSVRC2012 release")
        return {"train": self._generate_examples("train_archive", paths[TRAIN_ARCHIVE]),
                "validation": self._generate_examples("val_archive", paths[VAL_ARCHIVE])}

    def _generate_examples(self, kind: str, path: str) -> Iterator[tuple[str, dict]]:
        """Yields ``(key, example)`` from a split folder (``kind="folder"``) or an archive."""
        index = {name: i for i, name in enumerate(self.builder_config.class_names)}
        reader = {"folder": self._folder_examples, "train_archive": self._train_archive_examples,
                  "val_archive": self._val_archive_examples}[kind]
        yield from reader(path, index)

    def _folder_examples(self, folder: str, index: dict[str, int]) -> Iterator[tuple[str, dict]]:
        for name in sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))):
            for file in _image_files(os.path.join(folder, name)):
                path = os.path.join(folder, name, file)
                with open(path, "rb") as f:
                    data = f.read()
                _check_image(data, path)
                yield f"{name}/{file}", {"image": data, "label": index[name], "file_name": f"{name}/{file}"}

    def _train_archive_examples(self, path: str, index: dict[str, int]) -> Iterator[tuple[str, dict]]:
        # Streamed ("r|"): the 147 GB archive is read once, front to back, one class tar at a time.
        try:
            with tarfile.open(path, "r|") as outer:
                for member in outer:
                    if not member.isfile():
                        continue
                    name = posixpath.basename(member.name)
                    wnid = name[:-4] if name.endswith(".tar") else None
                    if wnid not in index:
                        raise DatasetError(f"{path}: {member.name} is not one of the 1000 class archives of ILSVRC2012")
                    with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as inner:
                        for image in inner:
                            if not image.isfile():
                                continue
                            data = inner.extractfile(image).read()
                            file = posixpath.basename(image.name)
                            _check_image(data, f"{path}: {member.name}/{image.name}")
                            yield f"{wnid}/{file}", {"image": data, "label": index[wnid], "file_name": file}
        except tarfile.TarError as e:
            raise DatasetError(f"{path} is not a readable tar archive ({e})") from None

    def _val_archive_examples(self, path: str, index: dict[str, int]) -> Iterator[tuple[str, dict]]:
        labels = official_validation_wnids()
        try:
            with tarfile.open(path, "r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    file = posixpath.basename(member.name)
                    match = VAL_NAME.match(file)
                    if match is None or not 1 <= int(match.group(1)) <= len(labels):
                        raise DatasetError(f"{path}: {member.name} is not an ILSVRC2012 validation image name")
                    data = tar.extractfile(member).read()
                    _check_image(data, f"{path}: {member.name}")
                    yield file, {"image": data, "label": index[labels[int(match.group(1)) - 1]], "file_name": file}
        except tarfile.TarError as e:
            raise DatasetError(f"{path} is not a readable tar archive ({e})") from None


@dataclasses.dataclass(frozen=True)
class ImageNetData:
    """The prepared splits (random-access sources of ``{"image": bytes, "label": int, ...}``)."""

    train: Sequence[dict[str, Any]]
    validation: Sequence[dict[str, Any]]
    class_names: tuple[str, ...]
    name: str  # the prepared dataset's config name, e.g. "ilsvrc2012"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _config(image_folder: str | None, expected_sizes: dict[str, int] | None) -> ImageNetConfig:
    if image_folder is not None:
        classes = folder_classes(image_folder)
        return ImageNetConfig(name=folder_config_name(image_folder, classes), folder=os.path.realpath(image_folder),
                              class_names=classes, description=f"ImageFolder tree {image_folder}")
    return ImageNetConfig(name=ARCHIVES_CONFIG, class_names=tuple(official_wnids()), expected_sizes=expected_sizes,
                          description="ILSVRC2012 official train and validation archives")


def build(
    data_dir: str,
    *,
    manual_dir: str | None = None,
    image_folder: str | None = None,
    expected_sizes: dict[str, int] | None = ARCHIVE_SIZES,
) -> str:
    """Prepares ImageNet (from the archives in ``manual_dir``) or an ImageFolder tree
    (``image_folder``) as array_record under ``data_dir``; nothing happens if it is prepared already.

    Args:
      data_dir: TFDS data dir; shards land in ``data_dir/pufferfish_imagenet/<config>/1.0.0``
        (config ``ilsvrc2012``, or ``folder_<hash of the tree's path and classes>``).
      manual_dir: folder holding ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar``;
        defaults to ``data_dir/downloads/manual``.
      image_folder: root of an ImageFolder tree instead of the archives.
      expected_sizes: archive name → byte size required (the official sizes); None accepts any
        (a subset in the official layout, e.g. for tests).

    Returns:
      The directory of the prepared dataset.

    Raises:
      DatasetError: the data is missing or malformed (named in the message).
    """
    config = _config(image_folder, expected_sizes)
    if image_folder is None:  # before TFDS creates anything: missing archives write nothing
        manual = manual_dir or os.path.join(data_dir, "downloads", "manual")
        missing = [name for name in (TRAIN_ARCHIVE, VAL_ARCHIVE) if not os.path.isfile(os.path.join(manual, name))]
        if missing:
            raise DatasetError(f"ImageNet not found: {' and '.join(missing)} missing from the manual dir {manual}; "
                               "download them from image-net.org, or use an ImageFolder tree")
    builder = PufferfishImageNet(data_dir=data_dir, config=config)
    try:
        prepare(builder, manual_dir)
    except DatasetError:
        raise
    except AssertionError as e:  # TFDS's missing-manual-dir message
        raise DatasetError(f"ImageNet not found: {e}") from None
    return os.fspath(builder.data_dir)


def prepared_dir(data_dir: str, image_folder: str | None = None) -> str:
    """Where :func:`build` puts (or put) this dataset."""
    name = folder_config_name(image_folder, folder_classes(image_folder)) if image_folder else ARCHIVES_CONFIG
    return os.path.join(data_dir, PufferfishImageNet.name, name, str(PufferfishImageNet.VERSION))


def load(data_dir: str | None = None, *, manual_dir: str | None = None, image_folder: str | None = None,
         expected_sizes: dict[str, int] | None = ARCHIVE_SIZES) -> ImageNetData:
    """The prepared splits in ``data_dir`` (default ``~/tensorflow_datasets``), preparing them first
    (from ``manual_dir``'s archives or ``image_folder``) if they are not there yet."""
    data_dir = data_dir or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    path = prepared_dir(data_dir, image_folder)
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        path = build(data_dir, manual_dir=manual_dir, image_folder=image_folder, expected_sizes=expected_sizes)
    reader = tfds.builder_from_directory(path)
    return ImageNetData(reader.as_data_source("train"), reader.as_data_source("validation"),
                        tuple(reader.info.features["label"].names), os.path.basename(os.path.dirname(path)))


# ----------------------------------------------------------------------------- decoding


def _rgb(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    return img if img.mode == "RGB" else img.convert("RGB")  # grayscale, CMYK, palette, RGBA


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = CROP_SCALE,
                            ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ``(top, left, h, w)`` of a crop covering a
    uniform fraction of the area in ``scale`` with a log-uniform aspect ratio in ``ratio``
    (10 tries, then the central crop with the aspect ratio clamped to ``ratio``)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def decode_train(data: bytes, seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Random-resized-crop to ``size``² (bilinear, antialiased as PIL) and a horizontal flip with
    probability ½, both drawn from ``seed``: uint8 ``(size, size, 3)``."""
    rng = np.random.default_rng(seed)
    img = _rgb(data)
    top, left, h, w = random_resized_crop_box(img.width, img.height, rng)
    out = np.asarray(img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h)))
    return out[:, ::-1] if rng.random() < 0.5 else out


def decode_eval(data: bytes, size: int = IMAGE_SIZE, resize: int | None = None) -> np.ndarray:
    """Resize the shorter side to ``resize`` (256 for 224, i.e. ``size / 0.875``), then the central
    ``size``² crop (torchvision's ``Resize`` + ``CenterCrop``): uint8 ``(size, size, 3)``."""
    resize = resize or eval_resize(size)
    img = _rgb(data)
    w, h = img.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    img = img.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)))


def eval_resize(size: int) -> int:
    """The evaluation resize for a crop of ``size``: 256 for 224."""
    return int(round(size / 0.875))


_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def default_threads() -> int:
    """Decoding threads per process: every core (``PUFFERFISH_DECODE_THREADS`` overrides)."""
    return int(os.environ.get("PUFFERFISH_DECODE_THREADS") or os.cpu_count() or 1)


def _map(fn, items: Sequence[Any], threads: int) -> list[Any]:
    """``[fn(*item) for item in items]``, on a process-wide pool of ``threads`` threads (shared by
    every batch being loaded, so grain's own reader threads do not multiply the thread count)."""
    if threads <= 1 or len(items) <= 1:
        return [fn(*item) for item in items]
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="decode")
    return list(pool.map(lambda item: fn(*item), items))


def _read(source: Sequence[dict], indices: np.ndarray) -> list[dict]:
    getitems = getattr(source, "__getitems__", None)
    return list(getitems([int(i) for i in indices])) if getitems else [source[int(i)] for i in indices]


def train_batches(
    source: Sequence[dict],
    global_batch: int,
    seed: int,
    epoch: int,
    shard_index: int = 0,
    shard_count: int = 1,
    *,
    image_size: int = IMAGE_SIZE,
    threads: int | None = None,
) -> grain.MapDataset:
    """This process's share of each global training batch of one epoch (random access by step).

    Every process shuffles the same global order (seed, epoch) and drops the remainder; each
    example's crop and flip come from its own seed, drawn for the whole global batch, so a
    process's rows are exactly those of a single-process run. Item ``i`` is
    ``{"image": uint8 (b, image_size, image_size, 3), "label": int32 (b,)}``, ``b = global_batch / shard_count``.
    """
    local = global_batch // shard_count
    threads = threads or default_threads()
    batches = grain.MapDataset.range(len(source)).shuffle(seed=_mix(seed, epoch)).batch(global_batch, drop_remainder=True)

    def load(indices, rng: np.random.Generator) -> dict[str, np.ndarray]:
        mine = slice(shard_index * local, (shard_index + 1) * local)
        seeds = rng.integers(0, 2**63 - 1, size=global_batch)[mine]
        records = _read(source, np.asarray(indices)[mine])
        images = _map(lambda r, s: decode_train(r["image"], int(s), image_size), list(zip(records, seeds)), threads)
        return {"image": np.stack(images), "label": np.array([r["label"] for r in records], np.int32)}

    return batches.random_map(load, seed=_mix(seed + 1, epoch))


def eval_batches(
    source: Sequence[dict],
    global_batch: int,
    shard_index: int = 0,
    shard_count: int = 1,
    *,
    image_size: int = IMAGE_SIZE,
    resize: int | None = None,
    threads: int | None = None,
) -> grain.MapDataset:
    """Sequential evaluation batches covering every example once (resize + center crop); the last
    batch is padded and carries ``mask`` (1 for real examples) so every process keeps one shape."""
    local = global_batch // shard_count
    threads = threads or default_threads()
    n_batches = -(-len(source) // global_batch)

    def load(i: int) -> dict[str, np.ndarray]:
        idx = i * global_batch + shard_index * local + np.arange(local)
        mask = idx < len(source)
        records = _read(source, np.where(mask, idx, 0))
        images = _map(lambda r: decode_eval(r["image"], image_size, resize), [(r,) for r in records], threads)
        return {"image": np.stack(images), "label": np.array([r["label"] for r in records], np.int32),
                "mask": mask.astype(np.float32)}

    return grain.MapDataset.range(n_batches).map(load)


# ----------------------------------------------------------------------------- test data


def write_image_folder(root: str, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
                       split: str = "train", sizes: Sequence[tuple[int, int]] | None = None,
                       quality: int = 90) -> list[str]:
    """Writes uint8 ``images`` as ``<root>/<split>/<class>/<i>.jpg`` JPEGs, each resized (bicubic)
    to ``sizes[i]`` = (width, height) if given: a real ImageFolder tree from arrays. Returns the paths."""
    paths = []
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(root, split, class_names[int(label)])
        os.makedirs(folder, exist_ok=True)
        img = Image.fromarray(np.asarray(image, np.uint8))
        if sizes is not None:
            img = img.resize(tuple(int(s) for s in sizes[i]), Image.BICUBIC)
        path = os.path.join(folder, f"{i:06d}.jpg")
        img.save(path, format="JPEG", quality=quality)
        paths.append(path)
    return paths
