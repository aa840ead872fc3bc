"""augment: the maths against numpy, DALI against the torch reference, epochs across ranks,
resume, and the error cases."""

import dataclasses
import hashlib
import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from augment import AugmentSpec, Loader
from augment.colour import colour_stats, lighting_offsets
from augment.errors import AugmentError
from augment.loader import dali_available
from augment.params import sample_params
from augment.sampler import batches_per_epoch, rank_samples
from augment.torch_ops import augment_batch, ten_crop_batch
from prep.errors import ShardFormatError
from prep.shards import open_shards
from prep.stats import StaleStatsError, load_stats

needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
BACKENDS = [pytest.param("dali", marks=needs_dali), "torch"]
pytestmark = pytest.mark.timeout(300)  # loaders start worker processes


def collect(loader, epoch=0):
    loader.set_epoch(epoch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def numpy_reference(images, params, colour, spec):
    """crop, mirror, lighting, normalise written out in numpy, HWC float64."""
    stats_p = np.array(colour.eigvec)
    lam01 = np.array(colour.eigval) / 255.0**2  # eigenvalues for pixels on [0, 1]
    out = []
    for b, image in enumerate(images):
        x, y = params.x[b], params.y[b]
        window = image[y : y + spec.crop, x : x + spec.crop].astype(np.float64)
        if params.mirror[b]:
            window = window[:, ::-1]
        window = window + 255.0 * stats_p @ (params.alpha[b] * lam01)
        if spec.normalize == "channel":
            window = (window - colour.mean) / colour.std
        elif spec.normalize == "mean-image":
            mean = colour.mean_image[y : y + spec.crop, x : x + spec.crop]
            window = window - (mean[:, ::-1] if params.mirror[b] else mean)
        out.append(window)
    return np.stack(out)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("normalize", ["channel", "mean-image", "none"])
def test_torch_reference_matches_numpy(stats_shards, normalize, layout):
    spec = AugmentSpec(normalize=normalize, layout=layout)
    colour = colour_stats(stats_shards, spec)
    reader = open_shards(stats_shards).split("train")
    images = np.stack([reader[i][0] for i in range(12)])
    params = sample_params(spec, 256, seed=5, epoch=1, indices=np.arange(12))
    assert params.mirror.any() and not params.mirror.all() and np.abs(params.alpha).max() > 0
    got = augment_batch(torch.from_numpy(images), params, spec, colour).numpy()
    expected = numpy_reference(images, params, colour, spec)
    if layout == "NCHW":
        expected = expected.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("normalize", ["torchvision", "none", "mean-image"])
def test_cpu_planes_are_the_float32_maths_to_the_last_bit(normalize):
    """The compiled CPU pass (augment.planes) against the same float32 operations in numpy:
    (v - (mean - o)) / std per channel, v + o without normalisation, (v - M_b) + o with the mean
    image M cut by each window (corner x_b, y_b) and mirrored with it; windows mirrored first."""
    from augment.colour import ColourStats
    from augment.torch_ops import finish, mirror_windows, on_device

    rng = np.random.default_rng(4)
    windows = rng.integers(0, 256, (5, 33, 33, 3), dtype=np.uint8)
    offsets = rng.normal(0, 9, (5, 3)).astype(np.float32)
    mirror = np.array([True, False, True, False, False])
    x, y = np.array([0, 7, 3, 7, 1]), np.array([7, 0, 2, 5, 7])  # windows of 33 in a 40 x 40 mean image
    spec = AugmentSpec(normalize=normalize, crop=33, lighting=0.1)
    mean_image = rng.normal(110, 40, (40, 40, 3)).astype(np.float32)
    colour = ColourStats(mean=np.array([123.675, 116.28, 103.53]), std=np.array([58.395, 57.12, 57.375]),
                         eigval=np.ones(3), eigvec=np.eye(3), mean_image=mean_image)
    kept = torch.full((5, 3, 33, 33), np.nan)
    flags = torch.from_numpy(mirror)
    got = finish(mirror_windows(torch.from_numpy(windows.copy()), flags), torch.from_numpy(offsets), spec,
                 on_device(colour, "cpu"), (torch.from_numpy(x), torch.from_numpy(y), flags), out=kept)
    assert got.data_ptr() == kept.data_ptr()
    values = np.where(mirror[:, None, None, None], windows[:, :, ::-1], windows).astype(np.float32)
    if normalize == "none":
        expected = values + offsets[:, None, None, :]
    elif normalize == "mean-image":
        means = np.stack([mean_image[t : t + 33, s : s + 33][:, ::-1 if m else 1] for s, t, m in zip(x, y, mirror)])
        expected = (values - means) + offsets[:, None, None, :]
    else:
        shift = colour.mean.astype(np.float32) - offsets
        expected = (values - shift[:, None, None, :]) / colour.std.astype(np.float32)
    np.testing.assert_array_equal(got.numpy(), expected.transpose(0, 3, 1, 2))
    if normalize == "mean-image":  # the compiled pass reads unchecked: a window outside M is refused first
        with pytest.raises(ValueError, match="outside the 40 x 40 mean image"):
            finish(torch.from_numpy(windows), torch.from_numpy(offsets), spec, on_device(colour, "cpu"),
                   (torch.from_numpy(x + 1), torch.from_numpy(y), flags))


def test_crop_positions_cover_every_offset_and_flips_are_fair():
    spec = AugmentSpec()
    params = sample_params(spec, 256, seed=0, epoch=0, indices=np.arange(20000))
    assert set(params.x.tolist()) == set(range(33)) and set(params.y.tolist()) == set(range(33))
    # 20000 fair coin flips: the share of heads is within 4 standard deviations (0.0141) of 1/2.
    assert abs(params.mirror.mean() - 0.5) < 4 * 0.5 / np.sqrt(20000)
    other_epoch = sample_params(spec, 256, seed=0, epoch=1, indices=np.arange(20000))
    assert (params.x != other_epoch.x).mean() > 0.9


def test_augmentation_is_independent_of_the_place_in_the_epoch():
    # The epoch order and the crop must come from independent draws: batches of mixed windows.
    n, batch = 10000, 128
    order = rank_samples(n, batch, 0, 1, shuffle=True, seed=3, epoch=2)
    params = sample_params(AugmentSpec(), 256, seed=3, epoch=2, indices=order)
    place = np.arange(len(order))
    for values in (params.x, params.y, params.mirror.astype(float), params.alpha[:, 0]):
        assert abs(np.corrcoef(place, values)[0, 1]) < 0.05
    distinct = [len(set(params.x[i : i + batch].tolist())) for i in range(0, len(order), batch)]
    assert min(distinct) > 20  # of 33 possible columns


def test_lighting_offset_covariance_is_the_papers(stats_shards):
    # offset (pixels on [0, 1]) = P (alpha * lambda), alpha ~ N(0, 0.1^2 I)
    #   => Cov(offset) = P diag((0.1 lambda)^2) P^T
    spec = AugmentSpec()
    colour = colour_stats(stats_shards, spec)
    n = 40000
    alpha = sample_params(spec, 256, seed=1, epoch=0, indices=np.arange(n)).alpha
    np.testing.assert_allclose(alpha.std(axis=0), 0.1, rtol=0.03)
    offsets01 = lighting_offsets(alpha, colour) / 255.0
    lam = np.array(colour.eigval) / 255.0**2
    expected = colour.eigvec @ np.diag((0.1 * lam) ** 2) @ colour.eigvec.T
    empirical = np.cov(offsets01.T)
    # Sampling error of a covariance entry is about sqrt(2 / n) ~ 0.7% of the largest variance.
    np.testing.assert_allclose(empirical, expected, atol=0.04 * expected.max())


def test_ten_crop_geometry_against_numpy_slicing(stats_shards):
    spec = AugmentSpec(mode="test10", normalize="none", layout="NHWC")
    colour = colour_stats(stats_shards, spec)
    reader = open_shards(stats_shards).split("val")
    images = np.stack([reader[i][0] for i in range(3)])
    views = ten_crop_batch(torch.from_numpy(images), spec, colour).numpy()
    assert views.shape == (3, 10, 224, 224, 3)
    corners = [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16)]  # (x, y): TL, TR, BL, BR, centre
    for b in range(3):
        for k, (x, y) in enumerate(corners):
            window = images[b, y : y + 224, x : x + 224]
            assert (views[b, k] == window).all()
            assert (views[b, 5 + k] == window[:, ::-1]).all()


@needs_dali
@pytest.mark.parametrize("resize_on", ["workers", "device"])  # the CPU's default graph, and a GPU's run on the CPU
@pytest.mark.parametrize("mode,normalize,dtype,layout", [
    ("train", "channel", "float32", "NCHW"), ("train", "mean-image", "float32", "NHWC"),
    ("train", "mean-image", "float32", "NCHW"), ("train", "none", "float16", "NCHW"),
    ("val", "channel", "float32", "NCHW"), ("test10", "channel", "float32", "NCHW"),
    ("test10", "mean-image", "float32", "NCHW"),
])
def test_dali_matches_torch(stats_shards, mode, normalize, dtype, layout, resize_on):
    spec = AugmentSpec(mode=mode, normalize=normalize, dtype=dtype, layout=layout)
    split = "train" if mode == "train" else "val"
    results = {}
    for backend in ("dali", "torch"):
        loader = Loader(stats_shards, split, batch_size=8, spec=spec, backend=backend, device="cpu", workers=1, seed=7,
                        resize_on=resize_on if backend == "dali" else None)
        results[backend] = collect(loader, epoch=3)
        loader.close()
    assert len(results["dali"]) == len(results["torch"]) > 0
    tolerance = 2e-3 if dtype == "float16" else 1e-4
    for (a, la), (b, lb) in zip(results["dali"], results["torch"]):
        assert torch.equal(la, lb) and a.dtype == b.dtype == getattr(torch, dtype)
        torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance * 64)


@needs_dali
def test_dali_jpeg_shards_decode_on_cpu(fake_src, tmp_path):
    from helpers import run_cli

    out = tmp_path / "jpeg"
    run_cli(["shard", str(fake_src), "--out", str(out), "--encoding", "jpeg", "--quiet"])
    spec = AugmentSpec(mode="val", normalize="none", layout="NHWC")
    # DALI's own decoder, as on a GPU: on the CPU the workers decode each window's region by default
    batches = {b: collect(Loader(out, "val", 4, spec, backend=b, device="cpu", workers=1,
                                 resize_on="device" if b == "dali" else None)) for b in ("dali", "torch")}
    for (a, la), (b, lb) in zip(batches["dali"], batches["torch"]):
        assert torch.equal(la, lb)
        assert (a - b).abs().mean() < 1.0  # libjpeg-turbo in both; DALI may use another IDCT


def sample_ids(images, labels) -> list[tuple[str, int]]:
    """What each sample of a batch is, whatever the rank that yields it: (digest of its pixels,
    label). With a window of the whole image, no lighting and no normalisation, an image is the
    stored one or its mirror, and both give the same digest. (Some fake images are equal.)"""
    ids = []
    for image, label in zip(images, labels.tolist()):
        pixels = np.asarray(image).round().astype(np.uint8)
        ids.append((min(hashlib.sha256(pixels.tobytes()).hexdigest(),
                        hashlib.sha256(pixels[:, ::-1].tobytes()).hexdigest()), label))
    return ids


def yielded_ids(loader, epoch=0) -> list[tuple[str, int]]:
    return [i for images, labels in collect(loader, epoch) for i in sample_ids(images, labels)]


def stored_ids(reader, indices) -> list[tuple[str, int]]:
    indices = list(indices)
    return sample_ids([reader[i][0] for i in indices], reader.labels[indices])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_yield_disjoint_samples_that_cover_the_split(stats_shards, backend):
    whole = dict(crop=256, lighting=0, normalize="none", layout="NHWC")  # images that name their sample
    train, val = open_shards(stats_shards).split("train"), open_shards(stats_shards).split("val")
    seen = []
    for rank in (0, 1):
        with Loader(stats_shards, "train", 4, AugmentSpec(**whole), backend=backend, device="cpu", rank=rank,
                    world_size=2, workers=1, seed=2) as loader:
            seen.append(yielded_ids(loader, epoch=1))
    assert len(seen[0]) == len(seen[1]) == len(train) // 8 * 4  # only the remainder is dropped
    assert not Counter(seen[0]) + Counter(seen[1]) - Counter(stored_ids(train, range(len(train))))  # disjoint
    # Evaluation: every sample exactly once over the ranks, rank r taking r, r + world, ...
    for rank in (0, 1, 2):
        with Loader(stats_shards, "val", 3, AugmentSpec(mode="val", **whole), backend=backend, device="cpu",
                    rank=rank, world_size=3, workers=1) as loader:
            assert yielded_ids(loader) == stored_ids(val, range(rank, len(val), 3))


@pytest.mark.parametrize("batch_size", [0, -3])
def test_a_batch_size_below_one_says_so(stats_shards, batch_size):
    with pytest.raises(AugmentError, match=f"batch size must be at least 1, got {batch_size}"):
        Loader(stats_shards, "val", batch_size, AugmentSpec(mode="val"), backend="torch", device="cpu", workers=0)


def test_sampler_arithmetic():
    assert batches_per_epoch(100, 8, 0, 3, shuffle=True) == 4  # 100 // 24
    assert batches_per_epoch(100, 8, 0, 3, shuffle=False) == 5  # ceil(34 / 8)
    assert batches_per_epoch(100, 8, 2, 3, shuffle=False) == 5  # ceil(33 / 8)
    parts = [rank_samples(100, 8, r, 3, shuffle=False) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    first = rank_samples(100, 8, 0, 1, shuffle=True, seed=1, epoch=0)
    assert len(first) == 96 and len(set(first.tolist())) == 96
    assert not np.array_equal(first, rank_samples(100, 8, 0, 1, shuffle=True, seed=1, epoch=1))
    # Two ranks of batch 4 see, step by step, the global batches one process of batch 8 sees.
    halves = [rank_samples(100, 4, r, 2, shuffle=True, seed=1, epoch=0).reshape(-1, 4) for r in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=1).reshape(-1), first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_gives_the_same_remaining_batches(stats_shards, backend):
    def make():
        return Loader(stats_shards, "train", 8, AugmentSpec(), backend=backend, device="cpu", workers=1, seed=4)

    full = collect(make(), epoch=1)
    loader = make()
    loader.set_epoch(1)
    iterator = iter(loader)
    next(iterator), next(iterator), next(iterator)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    rest = [(x.clone(), y.clone()) for x, y in resumed]
    assert len(rest) == len(full) - 3
    for (a, la), (b, lb) in zip(rest, full[3:]):
        assert torch.equal(la, lb) and torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize,layout,workers", [("none", "NHWC", 0), ("mean-image", "NCHW", 1)])
def test_the_loader_gives_the_numpy_maths(stats_shards, backend, normalize, layout, workers):
    """What a Loader yields (the paper's crops, mirrors, lighting; 0-255 values, or the mean image
    subtracted, as AlexNet trains) against the recipe written out in numpy."""
    spec = AugmentSpec(normalize=normalize, layout=layout)
    loader = Loader(stats_shards, "train", 8, spec, backend=backend, device="cpu", workers=workers, seed=9)
    loader.set_epoch(2)
    with loader:
        images, labels = next(iter(loader))
    indices = rank_samples(len(loader.reader), 8, 0, 1, True, 9, 2)[:8]
    params = sample_params(spec, 256, 9, 2, indices)
    assert params.mirror.any() and not params.mirror.all()
    sources = np.stack([loader.reader[int(i)][0] for i in indices])
    expected = numpy_reference(sources, params, loader.colour, spec)
    np.testing.assert_allclose(images.numpy(), expected if layout == "NHWC" else expected.transpose(0, 3, 1, 2),
                               atol=1e-4)
    assert labels.tolist() == loader.reader.labels[indices].tolist()


def test_errors_are_one_clear_line(stats_shards, fresh_copy, monkeypatch):
    with pytest.raises(AugmentError, match="unknown backend 'tf'"):
        Loader(stats_shards, backend="tf", device="cpu")
    with pytest.raises(ShardFormatError, match="has no split 'test'"):
        Loader(stats_shards, "test", device="cpu", backend="torch")
    with pytest.raises(AugmentError, match="batch size 999 is larger than the 60 images of split 'train'"):
        Loader(stats_shards, "train", 999, AugmentSpec(), device="cpu", backend="torch")
    assert len(Loader(stats_shards, "val", 999, AugmentSpec(mode="val"), device="cpu", backend="torch")) == 1
    if not torch.cuda.is_available():
        with pytest.raises(AugmentError, match="torch sees no CUDA GPU"):
            Loader(stats_shards, device="cuda")
    monkeypatch.setattr("augment.loader.dali_available", lambda: False)
    with pytest.raises(AugmentError, match="needs DALI: pip install nvidia-dali-cuda130"):
        Loader(stats_shards, backend="dali", device="cpu")
    manifest = json.loads((fresh_copy / "manifest.json").read_text())
    manifest["version"] = 2
    (fresh_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match="format version 2"):
        Loader(fresh_copy, device="cpu", backend="torch")


def test_statistics_rules(stats_shards, fresh_copy):
    with pytest.raises(AugmentError, match="PCA lighting needs colour statistics: run 'imgprep pca-stats"):
        Loader(fresh_copy, batch_size=8, device="cpu", backend="torch")  # fresh_copy has no stats.json
    with pytest.raises(AugmentError, match="mean-image normalisation needs"):
        Loader(fresh_copy, batch_size=8, spec=AugmentSpec(lighting=0, normalize="mean-image"), device="cpu",
               backend="torch")
    small = dataclasses.replace(colour_stats(stats_shards, AugmentSpec(normalize="mean-image")),
                                mean_image=np.zeros((128, 128, 3), np.float32))  # another folder's
    with pytest.raises(AugmentError, match="needs a 256 x 256 x 3 mean image for these shards, got 128 x 128 x 3"):
        Loader(stats_shards, batch_size=8, spec=AugmentSpec(normalize="mean-image"), colour=small, device="cpu",
               backend="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = Loader(fresh_copy, batch_size=8, spec=AugmentSpec(lighting=0), device="cpu", backend="torch")
    assert any("torchvision's ImageNet mean and std" in str(w.message) for w in caught)
    assert loader.colour.mean[0] == pytest.approx(0.485 * 255)
    for name in ("stats.json", "stats-mean.npy"):
        (fresh_copy / name).write_bytes((stats_shards / name).read_bytes())
    assert load_stats(fresh_copy)["images"] > 0  # same shards, same manifest: valid
    manifest = json.loads((fresh_copy / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"].pop()  # the shards change after the statistics
    (fresh_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StaleStatsError, match="was computed from other shards"):
        Loader(fresh_copy, batch_size=8, device="cpu", backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_cpu(stats_shards, backend):
    spec = AugmentSpec()
    on_gpu = collect(Loader(stats_shards, "train", 8, spec, backend=backend, device="cuda", workers=2, seed=3))
    reference = collect(Loader(stats_shards, "train", 8, spec, backend="torch", device="cpu", workers=1, seed=3))
    for (a, la), (b, lb) in zip(on_gpu, reference):
        assert a.is_cuda and torch.equal(la.cpu(), lb)
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_dali
def test_cuda_jpeg_shards_use_the_mixed_decoder(fake_src, tmp_path):
    from helpers import run_cli

    out = tmp_path / "jpeg"
    run_cli(["shard", str(fake_src), "--out", str(out), "--encoding", "jpeg", "--quiet"])
    spec = AugmentSpec(mode="val", normalize="none")
    gpu = collect(Loader(out, "val", 4, spec, backend="dali", device="cuda", workers=2))
    cpu = collect(Loader(out, "val", 4, spec, backend="torch", device="cpu", workers=1))
    for (a, la), (b, lb) in zip(gpu, cpu):
        assert torch.equal(la.cpu(), lb) and (a.cpu() - b).abs().mean() < 1.5


def test_preview_draws_the_grid(stats_shards, tmp_path):
    from PIL import Image

    from helpers import run_cli

    result = run_cli(["preview", str(stats_shards), "--out", str(tmp_path / "p.png"), "--images", "3", "--versions", "4"])
    assert result.exit_code == 0, result.output
    sheet = Image.open(tmp_path / "p.png")
    assert sheet.size == (5 * (256 + 6) + 6, 3 * (256 + 6 + 14) + 6)
    source_cell = np.asarray(sheet)[6 + 14 : 6 + 14 + 256, 6 : 6 + 256]
    assert source_cell.std() > 10  # an actual picture, not an empty cell


def test_preview_without_stats_says_what_to_run(fresh_copy, tmp_path):
    from helpers import run_cli

    result = run_cli(["preview", str(fresh_copy), "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 1 and "run 'imgprep pca-stats" in result.output


@pytest.mark.parametrize("backend", BACKENDS)
def test_torchvision_normalisation_is_its_published_constants(stats_shards, backend):
    # What torchvision's weights expect: ToTensor (x / 255), then Normalize with these numbers.
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    spec = AugmentSpec(mode="val", crop=224, normalize="torchvision", layout="NHWC")
    with Loader(stats_shards, "val", 4, spec, backend=backend, device="cpu", workers=1) as loader:
        images, _ = next(iter(loader))
        sources = np.stack([loader.reader[i][0] for i in range(4)])
    window = sources[:, 16:240, 16:240].astype(np.float64)  # the central 224 window of 256
    np.testing.assert_allclose(images.numpy(), (window / 255 - mean) / std, atol=1e-4)


def test_shard_window_order_visits_k_shards_at_a_time_and_each_sample_once():
    from augment.sampler import ShardWindows, epoch_permutation

    counts = [5, 3, 7, 4, 6, 2, 8]
    starts = tuple(np.concatenate([[0], np.cumsum(counts)]).tolist())
    n, windows = starts[-1], ShardWindows(starts, 3)
    order = epoch_permutation(n, 4, 1, windows)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))  # a permutation: each sample once
    shard_of = np.searchsorted(np.asarray(starts), order, side="right") - 1
    seen, block, got = [], set(), {}
    for shard in shard_of.tolist():  # the epoch is blocks of three whole shards (the last: what is left)
        block.add(shard)
        got[shard] = got.get(shard, 0) + 1
        assert len(block) <= 3, "a fourth shard began before the window's three were done"
        if len(block) == 3 and all(got[b] == counts[b] for b in block):
            seen += sorted(block)
            block = set()
    assert all(got[b] == counts[b] for b in block)
    seen += sorted(block)
    assert sorted(seen) == list(range(len(counts)))
    assert not np.array_equal(order, epoch_permutation(n, 4, 2, windows))  # another epoch, another order
    parts = [rank_samples(n, 4, r, 2, True, 4, 1, windows) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == (n // 8) * 4 and not set(parts[0]) & set(parts[1])
