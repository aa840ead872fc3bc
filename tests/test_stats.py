"""``imgprep pca-stats`` against numpy float64 over every pixel, and a hand-worked example."""

import json

import h5py
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from helpers import run_cli
from prep.errors import ShardFormatError
from prep.stats import StaleStatsError, compute_stats, load_stats

pytestmark = pytest.mark.timeout(300)  # pca-stats starts worker processes


def all_pixels(root, split="train") -> np.ndarray:
    """Every image of a split straight from the .h5 files: the independent reference."""
    images = []
    for path in sorted((root / split).glob("*.h5")):
        with h5py.File(path, "r") as f:
            if "images" in f:
                images.append(f["images"][:])
            else:
                images.append(np.stack([simplejpeg.decode_jpeg(b.tobytes(), "RGB") for b in f["jpeg"][:]]))
    return np.concatenate(images)


def assert_matches_numpy(stats, images):
    x = images.reshape(-1, 3).astype(np.float64)
    mean = x.mean(axis=0)
    cov = (x - mean).T @ (x - mean) / len(x)
    assert stats["images"] == len(images) and stats["pixels"] == len(x)
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(stats["cov"], cov, rtol=1e-9)
    np.testing.assert_allclose(stats["std"], x.std(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats["eigval"], np.sort(np.linalg.eigvalsh(cov))[::-1], rtol=1e-9)


def test_raw_stats_match_numpy_whatever_the_workers(fresh_copy):
    assert len(list((fresh_copy / "train").glob("*.h5"))) >= 4  # the split spans several shards
    compute_stats(fresh_copy, workers=1, progress=False)
    one_worker = (fresh_copy / "stats.json").read_bytes()
    stats = compute_stats(fresh_copy, workers=3, progress=False)
    assert (fresh_copy / "stats.json").read_bytes() == one_worker
    images = all_pixels(fresh_copy)
    assert_matches_numpy(stats, images)
    mean_image = np.load(fresh_copy / "stats-mean.npy")
    assert mean_image.shape == (256, 256, 3) and mean_image.dtype == np.float64
    np.testing.assert_allclose(mean_image, images.astype(np.float64).mean(axis=0), rtol=1e-12)


def test_eigen_decomposition_and_sign_rule(fresh_copy):
    stats = compute_stats(fresh_copy, workers=2, progress=False)
    cov, values, vectors = np.array(stats["cov"]), np.array(stats["eigval"]), np.array(stats["eigvec"])
    assert values[0] >= values[1] >= values[2] > 0
    for i in range(3):
        np.testing.assert_allclose(cov @ vectors[:, i], values[i] * vectors[:, i], atol=1e-9 * values[0])
        assert vectors[np.argmax(np.abs(vectors[:, i])), i] > 0
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=1e-12)


def test_hand_worked_two_colour_example(tmp_path):
    # Two flat images, (10, 20, 30) and (30, 20, 10): mean (20, 20, 20); var R = var B = 100,
    # var G = 0, cov RB = ((-10)(10) + (10)(-10)) / 2 = -100. Eigenvalues 200, 0, 0; the first
    # eigenvector is (1, 0, -1) / sqrt 2, its first component positive by the sign rule.
    for name, colour in (("a", (10, 20, 30)), ("b", (30, 20, 10))):
        path = tmp_path / "src" / "train" / "n01" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), colour).save(path)
    assert run_cli(["shard", str(tmp_path / "src"), "--out", str(tmp_path / "s"), "--size", "16",
                    "--quiet"]).exit_code == 0
    stats = compute_stats(tmp_path / "s", progress=False)
    assert stats["images"] == 2 and stats["pixels"] == 2 * 16 * 16
    assert stats["mean"] == [20.0, 20.0, 20.0]
    assert stats["cov"] == [[100.0, 0.0, -100.0], [0.0, 0.0, 0.0], [-100.0, 0.0, 100.0]]
    assert stats["std"] == [10.0, 0.0, 10.0]
    np.testing.assert_allclose(stats["eigval"], [200, 0, 0], atol=1e-12)
    np.testing.assert_allclose(np.array(stats["eigvec"])[:, 0], [2**-0.5, 0, -(2**-0.5)], atol=1e-12)


def test_jpeg_shards(fake_src, tmp_path):
    out = tmp_path / "jpeg"
    assert run_cli(["shard", str(fake_src), "--out", str(out), "--encoding", "jpeg", "--shard-size", "20",
                    "--quiet"]).exit_code == 0
    stats = compute_stats(out, workers=2, progress=False)
    assert_matches_numpy(stats, all_pixels(out))


def test_sample_is_seeded(fresh_copy):
    first = compute_stats(fresh_copy, sample=10, seed=1, progress=False)
    again = compute_stats(fresh_copy, sample=10, seed=1, workers=2, progress=False)
    other = compute_stats(fresh_copy, sample=10, seed=2, progress=False)
    assert first["images"] == 10 and first["sample"] == 10
    assert first["mean"] == again["mean"] and first["cov"] == again["cov"]
    assert first["mean"] != other["mean"]


def test_stale_statistics_are_detected(fresh_copy):
    compute_stats(fresh_copy, progress=False)
    assert load_stats(fresh_copy)["images"] > 0
    manifest = json.loads((fresh_copy / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"] = []  # the shards changed after the statistics were made
    (fresh_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StaleStatsError, match="was computed from other shards .* run 'imgprep pca-stats"):
        load_stats(fresh_copy)


def test_cli_prints_the_table(fresh_copy):
    result = run_cli(["pca-stats", str(fresh_copy), "--workers", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    for text in ("mean 0-255", "std 0-1", "eigenvalues", "eigenvectors", "stats.json"):
        assert text in result.output


def test_errors_give_one_line_and_no_stats(tmp_path, fresh_copy):
    result = run_cli(["pca-stats", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "does not exist" in result.output
    victim = sorted((fresh_copy / "train").glob("*.h5"))[1]
    victim.write_bytes(victim.read_bytes()[:50_000])
    result = run_cli(["pca-stats", str(fresh_copy), "--quiet"])
    assert result.exit_code == 1 and str(victim) in result.output and "Traceback" not in result.output
    assert not (fresh_copy / "stats.json").exists() and not list(fresh_copy.glob("*.tmp"))


def test_empty_split_is_refused(tmp_path):
    for folder, data in (("train/n01/a.png", None), ("val/n01/b.JPEG", b"broken")):
        path = tmp_path / "src" / folder
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20)).save(path) if data is None else path.write_bytes(data)
    assert run_cli(["shard", str(tmp_path / "src"), "--out", str(tmp_path / "s"), "--quiet"]).exit_code == 0
    with pytest.raises(ShardFormatError, match="split 'val' of .* has no images"):
        compute_stats(tmp_path / "s", split="val", progress=False)


def test_compiled_loops_still_compile_where_no_cache_can_be_written():
    """numba's on-disk cache refuses a function it has no place for (a read-only install,
    HOME=/): the project's loops are then compiled without it rather than failing to import.
    A function from generated source has no place either, which is how this is staged here."""
    import numba

    from prep.compiled import compiled

    namespace = {}
    exec(compile("def double(x):\n    return 2 * x\n", "<generated>", "exec"), namespace)
    with pytest.raises(RuntimeError, match="cannot cache"):
        numba.njit(cache=True)(namespace["double"])
    assert compiled(namespace["double"])(21) == 42
