"""Today's recipes: RandomResizedCrop over the whole stored image, validation at a resize, the
resolution changing between epochs; on square and aspect-kept shards, in both backends."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from augment import AugmentSpec, Loader
from augment.errors import AugmentError
from prep.errors import ImgprepError
from augment.loader import dali_available
from augment.params import SLOT_TRIES, SLOT_X, SLOT_Y, SLOTS, sample_params, uniforms
from augment.sampler import rank_samples

needs_dali = pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
BACKENDS = [pytest.param("dali", marks=needs_dali), "torch"]
pytestmark = pytest.mark.timeout(300)  # loaders start worker processes

RAW = dict(lighting=0, normalize="none", layout="NHWC")  # outputs on the 0-255 scale, HWC


def torchvision_window(u, height: int, width: int) -> tuple[int, int, int, int]:
    """(x, y, w, h): RandomResizedCrop.get_params as torchvision documents it, with scale
    (0.08, 1), ratio (3/4, 4/3), ten tries, then its centred fallback, drawing the uniforms ``u``
    (a sample's row) where it draws torch's random numbers."""
    area = height * width
    tries = u[SLOT_TRIES]
    for t in range(10):
        target_area = area * (0.08 + (1 - 0.08) * tries[2 * t])
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * tries[2 * t + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[SLOT_X] * (width - w + 1)), int(u[SLOT_Y] * (height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        w, h = int(round(height * 4 / 3)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@pytest.mark.parametrize("shape", [(256, 256), (256, 341), (341, 256), (256, 512), (300, 100)])
def test_random_resized_windows_are_torchvisions(shape):
    spec = AugmentSpec(crop_mode="random-resized")
    n = 4000
    indices = np.arange(n)
    params = sample_params(spec, np.tile(shape, (n, 1)), seed=3, epoch=1, indices=indices)
    u = uniforms(3, 1, indices, SLOTS["random-resized"])
    expected = np.array([torchvision_window(u[i], *shape) for i in range(n)])
    np.testing.assert_array_equal(np.stack([params.x, params.y, params.width, params.height], 1), expected)
    height, width = shape
    assert (params.x >= 0).all() and (params.x + params.width <= width).all()
    assert (params.y >= 0).all() and (params.y + params.height <= height).all()
    area = params.width * params.height / (height * width)
    assert area.min() >= 0.075 and area.max() <= 1
    if shape == (256, 256):
        assert 0.45 < area.mean() < 0.56  # U(0.08, 1), a few large tries not fitting
    if shape == (256, 512):  # the windows reach both far edges of a wide image
        assert params.x.min() == 0 and (params.x + params.width).max() == 512


@pytest.mark.parametrize("shape", [(300, 250), (250, 300), (341, 256), (224, 400), (100, 160)])
def test_window_resizes_are_torchs_antialiased_bilinear_into_the_slot(shape):
    """resize_into writes each window into its place in a batch buffer: shrinking along either
    axis, the pixels of F.interpolate(bilinear, antialias=True) on the planar image, exactly;
    only growing, OpenCV's bilinear, which is the same filter there (to a rounding step)."""
    import torch.nn.functional as F

    from augment.windows import resize_into

    window = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    batch = np.zeros((3, 224, 224, 3), np.uint8)
    resize_into(window[:, ::1], batch[1])
    planar = torch.from_numpy(window).permute(2, 0, 1)[None].contiguous()
    expected = F.interpolate(planar, size=(224, 224), mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy()
    if max(shape) > 224:
        np.testing.assert_array_equal(batch[1], expected)
    else:
        assert np.abs(batch[1].astype(int) - expected).max() <= 1
    assert not batch[0].any() and not batch[2].any()  # its neighbours in the buffer untouched


def pil_window(image: np.ndarray, x, y, w, h, side: int, mirror: bool) -> np.ndarray:
    """The window resized with Pillow's antialiased bilinear filter (torchvision's resized_crop)."""
    window = Image.fromarray(image).resize((side, side), Image.BILINEAR, box=(x, y, x + w, y + h))
    window = np.asarray(window, dtype=np.float64)
    return window[:, ::-1] if mirror else window


def collect(loader, epoch=0, res=None):
    loader.set_epoch(epoch, res=res)
    return [(images.clone(), labels.clone()) for images, labels in loader]


@pytest.fixture(scope="module", params=["square", "keep", "keep jpeg"])
def shard_kind(request, stats_shards, keep_shards, keep_jpeg_shards):
    return request.param, {"square": stats_shards, "keep": keep_shards, "keep jpeg": keep_jpeg_shards}[request.param]


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])  # NCHW float32 on the CPU: augment.planes' pass
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_resized_crops_match_pillow(shard_kind, backend, layout):
    _, root = shard_kind
    spec = AugmentSpec(crop_mode="random-resized", crop=160, **{**RAW, "layout": layout})
    with Loader(root, "train", 8, spec, backend=backend, device="cpu", workers=1, seed=1) as loader:
        batches = collect(loader)
        reader = loader.reader
    indices = rank_samples(len(reader), 8, 0, 1, True, 1, 0)
    differences = []
    for k, (images, labels) in enumerate(batches):
        chosen = indices[8 * k : 8 * k + 8]
        params = sample_params(spec, reader.shapes_of(chosen), 1, 0, chosen)
        assert labels.tolist() == reader.labels_of(chosen).tolist()
        for b, i in enumerate(chosen):
            expected = pil_window(reader[int(i)][0], params.x[b], params.y[b], params.width[b], params.height[b],
                                  160, params.mirror[b])
            got = images[b].numpy() if layout == "NHWC" else images[b].numpy().transpose(1, 2, 0)
            differences.append(np.abs(got - expected))
    difference = np.stack(differences)
    # uint8 kernels against Pillow's float one: rounding alone averages 0.25
    assert difference.mean() < 0.6 and np.percentile(difference, 99.9) <= 3, (difference.mean(), difference.max())


@needs_dali
@pytest.mark.parametrize("mode", ["train", "val", "test10"])
def test_dali_and_torch_give_the_same_batches(shard_kind, mode):
    _, root = shard_kind
    spec = AugmentSpec(mode=mode, crop_mode="random-resized", crop=128, val_resize=146, normalize="channel")
    split = "train" if mode == "train" else "val"
    results = {}
    for backend in ("dali", "torch"):
        with Loader(root, split, 4, spec, backend=backend, device="cpu", workers=1, seed=5) as loader:
            results[backend] = collect(loader, epoch=2)
    assert len(results["dali"]) == len(results["torch"]) > 0
    for (a, la), (b, lb) in zip(results["dali"], results["torch"]):
        assert torch.equal(la, lb) and a.shape == b.shape
        # the same uint8 windows from the workers; on the CPU both backends finish them with torch_ops,
        # so this holds their feeds (order, windows, parameters, ten views) to each other
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_dali
def test_dalis_device_resize_differs_only_by_its_kernel(keep_shards):
    # The graph a GPU runs (DALI resizes each window itself), here on the CPU, against the workers'
    # windows: the same windows; DALI's antialiased linear resampler against ours.
    spec = AugmentSpec(crop_mode="random-resized", crop=128, **RAW)
    out = {}
    for resize_on in ("device", "workers"):
        with Loader(keep_shards, "train", 8, spec, backend="dali", device="cpu", workers=1, seed=2,
                    resize_on=resize_on) as loader:
            out[resize_on] = collect(loader)
    for (a, la), (b, lb) in zip(out["device"], out["workers"]):
        assert torch.equal(la, lb)
        difference = (a - b).abs()
        assert difference.mean() < 1.0 and torch.quantile(difference.flatten()[::7], 0.999) <= 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_resizes_the_shorter_side_then_takes_the_centre(keep_shards, backend):
    # torchvision's Resize(146) + CenterCrop(128), written out with Pillow.
    spec = AugmentSpec(mode="val", crop=128, val_resize=146, **RAW)
    with Loader(keep_shards, "val", 4, spec, backend=backend, device="cpu", workers=1) as loader:
        images = torch.cat([batch for batch, _ in collect(loader)])
        reader = loader.reader
    for i in range(len(reader)):
        source = Image.fromarray(reader[i][0])
        width, height = source.size
        short, long = min(width, height), max(width, height)
        size = (146, int(146 * long / short)) if width <= height else (int(146 * long / short), 146)
        resized = source.resize(size, Image.BILINEAR)
        left, top = int(round((size[0] - 128) / 2)), int(round((size[1] - 128) / 2))
        expected = np.asarray(resized.crop((left, top, left + 128, top + 128)), dtype=np.float64)
        # One resize of the window (to the fraction of a pixel) against torchvision's two steps.
        assert np.abs(images[i].numpy() - expected).mean() < 0.1, i


@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_crops_of_kept_images_are_the_corners_and_centre(keep_shards, backend):
    spec = AugmentSpec(mode="test10", crop=200, **RAW)
    with Loader(keep_shards, "val", 3, spec, backend=backend, device="cpu", workers=1) as loader:
        views, _ = next(iter(loader))
        reader = loader.reader
    assert views.shape == (3, 10, 200, 200, 3)
    for b in range(3):
        image = reader[b][0]
        height, width = image.shape[:2]
        corners = [(0, 0), (width - 200, 0), (0, height - 200), (width - 200, height - 200),
                   ((width - 200) // 2, (height - 200) // 2)]
        for k, (x, y) in enumerate(corners):
            window = image[y : y + 200, x : x + 200].astype(np.float32)
            assert np.array_equal(views[b, k].numpy(), window)
            assert np.array_equal(views[b, 5 + k].numpy(), window[:, ::-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_crops_of_kept_images_stay_inside_them(keep_shards, backend):
    spec = AugmentSpec(crop=224, **RAW)
    with Loader(keep_shards, "train", 8, spec, backend=backend, device="cpu", workers=1, seed=4) as loader:
        (images, _), *_ = collect(loader, epoch=1)
        reader = loader.reader
    chosen = rank_samples(len(reader), 8, 0, 1, True, 4, 1)[:8]
    params = sample_params(spec, reader.shapes_of(chosen), 4, 1, chosen)
    for b, i in enumerate(chosen):
        x, y = params.x[b], params.y[b]
        window = reader[int(i)][0][y : y + 224, x : x + 224]
        window = window[:, ::-1] if params.mirror[b] else window
        assert np.array_equal(images[b].numpy(), window.astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_resolution_changes_between_epochs_without_new_workers(keep_shards, backend):
    spec = AugmentSpec(crop_mode="random-resized", crop=128, **RAW)
    with Loader(keep_shards, "train", 8, spec, backend=backend, device="cpu", workers=2, seed=6, max_res=160) as loader:
        first = collect(loader, epoch=0, res=96)
        pids = loader.worker_pids()
        second = collect(loader, epoch=1, res=160)
        third = collect(loader, epoch=2)  # back to the spec's crop
        assert loader.worker_pids() == pids and len(pids) == 2
        assert loader.state_dict()["res"] == 128
    assert {tuple(x.shape) for x, _ in first} == {(8, 96, 96, 3)}
    assert {tuple(x.shape) for x, _ in second} == {(8, 160, 160, 3)}
    assert {tuple(x.shape) for x, _ in third} == {(8, 128, 128, 3)}
    with Loader(keep_shards, "train", 8, spec, backend=backend, device="cpu", workers=1, seed=6, max_res=160) as fresh:
        again = collect(fresh, epoch=1, res=160)  # a loader that went straight there gives the same batches
    for (a, la), (b, lb) in zip(second, again):
        assert torch.equal(la, lb) and torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resume_mid_epoch_keeps_the_resolution(keep_shards, backend):
    spec = AugmentSpec(crop_mode="random-resized", crop=128, normalize="none")

    def make():
        return Loader(keep_shards, "train", 8, spec, backend=backend, device="cpu", workers=1, seed=8, max_res=160)

    with make() as loader:
        full = collect(loader, epoch=1, res=160)
        loader.set_epoch(1, res=160)
        iterator = iter(loader)
        next(iterator), next(iterator)
        state = loader.state_dict()
    assert state["res"] == 160 and state["position"] == 2
    with make() as resumed:
        resumed.load_state_dict(state)
        rest = [(x.clone(), y.clone()) for x, y in resumed]
    assert len(rest) == len(full) - 2
    for (a, la), (b, lb) in zip(rest, full[2:]):
        assert torch.equal(la, lb) and torch.equal(a, b)


def test_resolution_rules_are_one_line(keep_shards, stats_shards):
    loader = Loader(stats_shards, "train", 8, AugmentSpec(), backend="torch", device="cpu", workers=0)
    with pytest.raises(AugmentError, match="res 300 is larger than the 256 px shard images"):
        loader.set_epoch(0, res=300)
    with pytest.raises(AugmentError, match="larger than this loader's max_res 224"):
        Loader(keep_shards, "train", 8, AugmentSpec(crop_mode="random-resized", normalize="channel"),
               backend="torch", device="cpu").set_epoch(0, res=256)
    with pytest.raises(AugmentError, match="res applies to training batches"):
        Loader(stats_shards, "val", 8, AugmentSpec(mode="val"), backend="torch", device="cpu").set_epoch(0, res=192)
    with pytest.raises(ImgprepError, match="images of many sizes .policy keep.: they have no mean image"):
        Loader(keep_shards, "train", 8, AugmentSpec(normalize="mean-image"), backend="torch", device="cpu")
    with pytest.raises(AugmentError, match="val_resize 200 is smaller than the crop 224"):
        AugmentSpec(mode="val", val_resize=200)


def test_jpeg_windows_decode_only_the_window_to_the_pixels_of_the_whole_image(keep_jpeg_shards, monkeypatch):
    """The default path (DALI, worker processes) decodes each training window's region alone;
    decoding every image whole and cutting it must give the very same batches."""
    import prep.encodings

    spec = AugmentSpec(crop_mode="random-resized", crop=96, **RAW)
    decoded_regions = []
    real = prep.encodings.decode_jpeg_windows
    monkeypatch.setattr(prep.encodings, "decode_jpeg_windows",
                        lambda blobs, boxes: decoded_regions.append(len(blobs)) or real(blobs, boxes))
    with Loader(keep_jpeg_shards, "train", 8, spec, backend="torch", device="cpu", workers=0, seed=4) as loader:
        by_window = collect(loader, epoch=1)
    assert sum(decoded_regions) == 8 * len(by_window) > 0  # every sample went through the region decoder
    monkeypatch.setattr(prep.encodings, "decode_jpeg_windows", real)
    with Loader(keep_jpeg_shards, "train", 8, spec, device="cpu", workers=2, seed=4) as loader:
        assert loader.backend == ("dali" if dali_available() else "torch")
        default = collect(loader, epoch=1)
    monkeypatch.setattr(prep.encodings, "_window_decoder", lambda: None)  # forked workers inherit it
    with Loader(keep_jpeg_shards, "train", 8, spec, device="cpu", workers=2, seed=4) as loader:
        whole = collect(loader, epoch=1)
    assert len(default) == len(whole) == len(by_window)
    for (a, la), (b, lb), (c, lc) in zip(default, whole, by_window):
        assert torch.equal(la, lb) and torch.equal(la, lc)
        assert torch.equal(a, b) and torch.equal(a, c)

