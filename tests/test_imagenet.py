"""ResNet-50 / WRN-50-2: exact parameter and MAC counts (built abstractly), the TFDS builder from an
ImageFolder tree and from ILSVRC2012-layout archives of real images, the grain pipeline, and the
``experiments.imagenet`` command end to end at a tiny resolution."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pufferfish_jax import count_macs, count_params, low_rank_init, plan
from pufferfish_jax.data import imagenet
from pufferfish_jax.data.tfds_common import DatasetError
from pufferfish_jax.models import IMAGENET_ARCHS, imagenet_resnet
from tests.conftest import run_module

EXPECTED_PARAMS = {"resnet50": (25_557_032, 15_202_344), "wrn50_2": (68_883_240, 40_047_400)}
# Conv + matmul MACs of one 224×224 image (derived independently in _reference_macs).
EXPECTED_MACS = {"resnet50": (4_089_184_256, 3_533_635_584), "wrn50_2": (11_398_021_120, 9_907_994_624)}
OFFICIAL_GMACS = {"resnet50": (4.12, 3.60), "wrn50_2": (11.44, 9.99)}
WIDTH_PER_GROUP = {"resnet50": 64, "wrn50_2": 128}
CLASSES = ("airplane", "automobile", "bird", "cat")


def abstract(arch, low_rank=False):
    spec = IMAGENET_ARCHS[arch]
    if low_rank:
        return nnx.eval_shape(lambda: low_rank_init(lambda: spec.build(rngs=nnx.Rngs(0)), 0.25, spec.keep_full_rank))
    return nnx.eval_shape(lambda: spec.build(rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------- counts


def _reference_macs(width_per_group, low_rank, official_layout=False, ptflops_extras=False):
    """MACs of one 224×224 image from the architecture alone (torchvision's layer list).

    ``low_rank``: layer4's convs split at rank int(min(k·k·c_in, c_out)/4). ``official_layout``:
    the official code's low-rank downsample, whose *second* 1×1 factor strides (its first runs
    at the input resolution). ``ptflops_extras``: what ptflops also counts — 2 per BN element,
    1 per ReLU output, 1 per pooled input element, the classifier bias.
    """
    macs = extras = 0

    def conv(c_in, c_out, k, hw, split):
        if not split:
            return hw * hw * k * k * c_in * c_out
        r = min(k * k * c_in, c_out) // 4
        return hw * hw * r * (k * k * c_in + c_out)

    macs += 112 * 112 * 7 * 7 * 3 * 64
    extras += 3 * 112 * 112 * 64 + 112 * 112 * 64  # BN + ReLU, max-pool input
    hw, c_in = 56, 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        width, c_out, split = width_per_group * 2**stage, 256 * 2**stage, low_rank and stage == 3
        for b in range(blocks):
            out_hw = hw // 2 if (b == 0 and stage > 0) else hw
            macs += conv(c_in, width, 1, hw, split) + conv(width, width, 3, out_hw, split)
            macs += conv(width, c_out, 1, out_hw, split)
            extras += 3 * hw * hw * width + 3 * out_hw * out_hw * width + 3 * out_hw * out_hw * c_out
            if b == 0:
                if split and official_layout:
                    r = c_in // 4
                    macs += hw * hw * c_in * r + out_hw * out_hw * r * c_out
                else:
                    macs += conv(c_in, c_out, 1, out_hw, split)
                extras += 2 * out_hw * out_hw * c_out
            c_in, hw = c_out, out_hw
    macs += c_in * 1000
    extras += hw * hw * c_in + 1000
    return macs + (extras if ptflops_extras else 0)


def test_reference_formula_reproduces_the_official_macs():
    # The official ptflops figures come out of the same architecture once BN/ReLU/pooling are
    # counted and the official downsample layout is used: the reference formula is right.
    for arch, (vanilla, puffer) in OFFICIAL_GMACS.items():
        wpg = WIDTH_PER_GROUP[arch]
        assert round(_reference_macs(wpg, False, ptflops_extras=True) / 1e9, 2) == vanilla
        assert round(_reference_macs(wpg, True, official_layout=True, ptflops_extras=True) / 1e9, 2) == puffer
        assert _reference_macs(wpg, False) == EXPECTED_MACS[arch][0]
        assert _reference_macs(wpg, True) == EXPECTED_MACS[arch][1]


@pytest.mark.parametrize("arch", ["resnet50", "wrn50_2"])
def test_exact_parameter_and_mac_counts(arch):
    vanilla, low = abstract(arch), abstract(arch, low_rank=True)
    assert (count_params(vanilla), count_params(low)) == EXPECTED_PARAMS[arch]
    assert count_macs(vanilla, (1, 224, 224, 3)) == EXPECTED_MACS[arch][0]
    assert count_macs(low, (1, 224, 224, 3)) == EXPECTED_MACS[arch][1]


def test_hybrid_factorizes_exactly_layer4():
    layers = plan(abstract("resnet50"), 0.25, imagenet_resnet.KEEP_FULL_RANK)
    expected = {"layer4.0.conv1": 128, "layer4.0.conv2": 128, "layer4.0.conv3": 128, "layer4.0.downsample.layers.0": 256}
    expected.update({f"layer4.{b}.{c}": 128 for b in (1, 2) for c in ("conv1", "conv2", "conv3")})
    assert {l.path: l.rank for l in layers} == expected
    # Everything else stays full rank: with an empty hybrid list, layers 1-3 and fc would be split too.
    assert len(plan(abstract("resnet50"), 0.25)) > 40


def test_weight_decay_mask_skips_one_dimensional_parameters():
    from experiments.imagenet import weight_decay_mask

    model = nnx.eval_shape(lambda: IMAGENET_ARCHS["resnet50"].build(num_classes=10, width=0.0625, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    mask = weight_decay_mask(params)
    flat = dict(zip([str(p) for p, _ in nnx.to_flat_state(params)], [m for _, m in nnx.to_flat_state(mask)]))
    assert flat and all(v == ("kernel" in k) for k, v in flat.items())
    # Applied as the experiment applies it (optax, on nnx.State): kernels decay, biases and BN do not.
    import jax
    import optax

    tiny = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    params = nnx.state(tiny, nnx.Param)
    tx = optax.add_decayed_weights(0.5, mask=weight_decay_mask)
    updates, _ = tx.update(jax.tree.map(lambda p: p * 0, params), tx.init(params), params)
    conv, bn = updates["layers"][0], updates["layers"][1]
    np.testing.assert_allclose(conv["kernel"][...], 0.5 * tiny.layers[0].kernel[...])
    assert not np.any(conv["bias"][...]) and not np.any(bn["scale"][...]) and not np.any(bn["bias"][...])


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory, cifar_splits):
    """A real ImageFolder: CIFAR images of 4 classes upscaled to random sizes (some non-square,
    some larger than 224) as JPEGs, one grayscale JPEG and one PNG stored under a .jpg name."""
    train, test = cifar_splits
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    idx = np.concatenate([np.flatnonzero(train.labels == c)[:6] for c in range(4)])
    sizes = rng.integers(40, 300, size=(len(idx), 2))
    imagenet.write_image_folder(str(root), train.images[idx], train.labels[idx], CLASSES, sizes=sizes)
    vidx = np.concatenate([np.flatnonzero(test.labels == c)[:2] for c in range(4)])
    imagenet.write_image_folder(str(root), test.images[vidx], test.labels[vidx], CLASSES, split="val",
                                sizes=rng.integers(40, 120, size=(len(vidx), 2)))
    Image.fromarray(train.images[idx[0]]).convert("L").save(root / "train" / "airplane" / "gray.jpg")
    Image.fromarray(train.images[idx[1]]).save(root / "train" / "airplane" / "png.jpg", format="PNG")
    return root, train.images[idx], train.labels[idx]


@pytest.fixture(scope="module")
def prepared(image_tree, tmp_path_factory):
    root, _, _ = image_tree
    tfds_dir = str(tmp_path_factory.mktemp("tfds"))
    return imagenet.load(tfds_dir, image_folder=str(root)), tfds_dir


def test_image_folder_builder_keeps_files_and_labels(image_tree, prepared):
    root, _, _ = image_tree
    prepared, _ = prepared
    assert prepared.class_names == CLASSES and prepared.name.startswith("folder_")
    assert (len(prepared.train), len(prepared.validation)) == (26, 8)
    for source, split in ((prepared.train, "train"), (prepared.validation, "val")):
        for i in range(len(source)):
            item = source[i]
            name = item["file_name"].decode()
            assert item["label"] == CLASSES.index(name.split("/")[0])
            assert item["image"] == (root / split / name).read_bytes()  # the encoded file, byte for byte
            if name in ("airplane/gray.jpg", "airplane/png.jpg"):  # grayscale and PNG decode to RGB
                assert imagenet.decode_train(item["image"], 0, 32).shape == (32, 32, 3)
                assert imagenet.decode_eval(item["image"], 32).shape == (32, 32, 3)


def test_prepared_dataset_is_reused(image_tree, prepared):
    root, _, _ = image_tree
    data, tfds_dir = prepared
    info = os.path.join(imagenet.prepared_dir(tfds_dir, str(root)), "dataset_info.json")
    stamp = os.stat(info).st_mtime_ns
    again = imagenet.load(tfds_dir, image_folder=str(root))
    assert (again.name, len(again.train), again.class_names) == (data.name, len(data.train), data.class_names)
    assert os.stat(info).st_mtime_ns == stamp


def test_decode_eval_matches_the_image(cifar_splits):
    # With resize == size there is no crop: the decoded JPEG must be the image itself (JPEG error
    # only), in RGB order and the right orientation.
    train, _ = cifar_splits
    buf = io.BytesIO()
    Image.fromarray(train.images[5]).save(buf, format="JPEG", quality=95)
    out = imagenet.decode_eval(buf.getvalue(), 32, resize=32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(float) - train.images[5]).mean() < 4
    assert np.abs(out.astype(float) - train.images[5][:, ::-1]).mean() > 10  # not mirrored


def test_eval_resize_and_center_crop_geometry():
    # A 400×200 image whose left half is black and right half white: resize to short side 256
    # (512×256), central 224 crop keeps columns 144..368 of 512, so the boundary sits at column 112.
    img = np.zeros((200, 400, 3), np.uint8)
    img[:, 200:] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    out = imagenet.decode_eval(buf.getvalue())
    assert out.shape == (224, 224, 3)
    assert out[:, :110].max() < 10 and out[:, 114:].min() > 245


def test_random_resized_crop_box_follows_torchvision():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = imagenet.random_resized_crop_box(500, 375, rng)
        assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
        assert 0.08 * 0.99 <= h * w / (500 * 375) <= 1.0
        assert 3 / 4 * 0.98 <= w / h <= 4 / 3 * 1.02
    # An image too elongated for any crop: the fallback is the central crop, aspect clamped to 4/3.
    assert imagenet.random_resized_crop_box(1000, 10, np.random.default_rng(0)) == (0, 493, 10, 13)


def test_train_batches_deterministic_sharded_and_augmented(prepared):
    prepared, _ = prepared
    one = imagenet.train_batches(prepared.train, 8, seed=3, epoch=0, image_size=32, threads=2)
    assert len(one) == 26 // 8
    first = one[0]
    assert first["image"].shape == (8, 32, 32, 3) and first["image"].dtype == np.uint8
    assert first["label"].dtype == np.int32 and set(first["label"]) <= set(range(4))
    np.testing.assert_array_equal(imagenet.train_batches(prepared.train, 8, 3, 0, image_size=32, threads=1)[0]["image"],
                                  first["image"])  # threads do not change the result
    halves = [imagenet.train_batches(prepared.train, 8, 3, 0, i, 2, image_size=32)[0] for i in range(2)]
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), first[key])
    other = imagenet.train_batches(prepared.train, 8, seed=3, epoch=1, image_size=32)[0]
    assert not np.array_equal(other["image"], first["image"])
    # Every epoch covers each image at most once, all but the remainder.
    seen = np.concatenate([b["label"] for b in one])
    assert len(seen) == 24


def test_eval_batches_cover_every_image_once(prepared):
    prepared, _ = prepared
    batches = list(imagenet.eval_batches(prepared.validation, 6, image_size=32))
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[mask > 0]
    assert len(batches) == 2 and mask.sum() == 8
    assert sorted(labels) == sorted(prepared.validation[i]["label"] for i in range(8))
    halves = [imagenet.eval_batches(prepared.validation, 6, i, 2, image_size=32)[1] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), batches[1]["image"])


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _jpeg(image: np.ndarray, size: int = 80) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).resize((size, size), Image.BICUBIC).save(buf, format="JPEG")
    return buf.getvalue()


def test_archive_builder_official_layout(tmp_path, cifar_splits):
    train, test = cifar_splits
    wnids = imagenet.official_wnids()
    val_wnids = imagenet.official_validation_wnids()
    assert len(wnids) == 1000 and wnids == sorted(wnids) and len(val_wnids) == 50000
    inner = {w: {f"{w}_{i}.JPEG": _jpeg(train.images[10 * k + i]) for i in range(2)} for k, w in enumerate(wnids[:2])}
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / imagenet.TRAIN_ARCHIVE).write_bytes(_tar_bytes({f"{w}.tar": _tar_bytes(f) for w, f in inner.items()}))
    val_files = {f"ILSVRC2012_val_{k:08d}.JPEG": _jpeg(test.images[k]) for k in (3, 1, 2)}
    (manual / imagenet.VAL_ARCHIVE).write_bytes(_tar_bytes(val_files))

    with pytest.raises(DatasetError, match="bytes but the official archive has 147897477120"):
        imagenet.build(str(tmp_path / "refused"), manual_dir=str(manual))
    data = imagenet.load(str(tmp_path / "tfds"), manual_dir=str(manual), expected_sizes=None)
    assert data.name == "ilsvrc2012" and data.num_classes == 1000
    got = {data.train[i]["file_name"].decode(): (data.train[i]["label"], data.train[i]["image"]) for i in range(4)}
    assert got == {name: (wnids.index(w), jpeg) for w, files in inner.items() for name, jpeg in files.items()}
    for i in range(3):
        item = data.validation[i]
        name = item["file_name"].decode()
        assert item["image"] == val_files[name]
        assert item["label"] == wnids.index(val_wnids[int(name[15:23]) - 1])


def test_missing_archives_write_nothing(tmp_path):
    with pytest.raises(DatasetError, match="ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar missing"):
        imagenet.load(str(tmp_path / "tfds"), manual_dir=str(tmp_path))
    assert not (tmp_path / "tfds").exists()


def test_bad_image_is_named(tmp_path, image_tree):
    root, _, _ = image_tree
    bad = tmp_path / "tree"
    for split, cls in (("train", "a"), ("val", "a")):
        (bad / split / cls).mkdir(parents=True)
    (bad / "train" / "a" / "x.jpg").write_bytes(b"not a jpeg")
    (bad / "val" / "a" / "y.jpg").write_bytes((root / "val" / "bird").joinpath(sorted(os.listdir(root / "val" / "bird"))[0]).read_bytes())
    with pytest.raises(DatasetError, match="x.jpg is not a readable image"):
        imagenet.load(str(tmp_path / "tfds"), image_folder=str(bad))


# ----------------------------------------------------------------------------- command line


def _bad(argv, capsys, tmp_path):
    from experiments.imagenet import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet18"], "unknown arch 'resnet18'; choose one of: resnet50, wrn50_2"),
    (["--image-size", "16"], "--image-size must be at least 32"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--dtype", "float16"], "--dtype"),
    (["--ranks", "0"], "rank ratio"),
])
def test_bad_input_is_one_sentence_exit_2(argv, message, capsys, tmp_path):
    assert message in _bad(argv, capsys, tmp_path)


def test_missing_data_is_one_sentence_exit_2(capsys, tmp_path):
    err = _bad(["--data-dir", str(tmp_path / "tfds"), "--manual-dir", str(tmp_path)], capsys, tmp_path)
    assert "ILSVRC2012_img_train.tar" in err and not (tmp_path / "tfds").exists()
    err = _bad(["--image-folder", str(tmp_path / "none")], capsys, tmp_path)
    assert "does not exist" in err


def test_dry_run_reports_paper_counts():
    proc = run_module("experiments.imagenet", "--dry-run", "--arch", "wrn50_2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report["params_vanilla"], report["params_pufferfish"]) == EXPECTED_PARAMS["wrn50_2"]
    assert (report["macs_vanilla"], report["macs_pufferfish"]) == EXPECTED_MACS["wrn50_2"]
    assert report["grad_bytes_pufferfish"] == 4 * 40_047_400 and report["factorized_layers"] == 10


def test_end_to_end_bf16_warmup_transition_low_rank(tmp_path, image_tree):
    """The real command on a real (tiny) ImageFolder: TFDS preparation, grain JPEG decoding, a bf16
    vanilla epoch, the SVD switch of layer4, a low-rank epoch, validation each epoch."""
    root, _, _ = image_tree
    out = tmp_path / "run"
    proc = run_module("experiments.imagenet", "--image-folder", str(root), "--data-dir", str(tmp_path / "tfds"),
                      "--width", "0.0625", "--image-size", "32", "--batch-size", "8", "--epochs", "2",
                      "--warmup-epochs", "1", "--max-steps-per-epoch", "2", "--dtype", "bfloat16",
                      "--decode-threads", "2", "--no-progress", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "phase" in r]
    assert [r["phase"] for r in epochs] == ["warmup", "low_rank"]
    transition = [r for r in records if r.get("event") == "transition"]
    assert len(transition) == 1 and transition[0]["factorized_layers"] == 10
    tiny = IMAGENET_ARCHS["resnet50"]
    vanilla = nnx.eval_shape(lambda: tiny.build(num_classes=4, width=0.0625, rngs=nnx.Rngs(0)))
    low = nnx.eval_shape(lambda: low_rank_init(lambda: tiny.build(num_classes=4, width=0.0625, rngs=nnx.Rngs(0)),
                                               0.25, tiny.keep_full_rank))
    assert summary["params_vanilla"] == count_params(vanilla) and summary["params_final"] == count_params(low)
    for r in epochs:
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) and 0 <= r["val_accuracy"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["label_smoothing"] == 0.1 and config["milestones"] == [30, 60, 80]


def test_bench_input_reports_images_per_second(tmp_path):
    proc = run_module("experiments.bench_input", "--images", "8", "--min-size", "64", "--max-size", "96",
                      "--image-size", "32", "--batch-size", "4", "--threads", "1", "2", "--repeats", "1",
                      "--work-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tree"]["images"] == 8 and result["per_worker"]["train_img_s"] > 0
    assert result["per_worker"]["eval_img_s"] > 0 and set(result["threads"]) == {"1", "2"}
