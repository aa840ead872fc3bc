"""ResNets laid out as torchvision's, FFCV's presets, progressive resizing and its schedule,
checked against the architecture and FFCV's published configs worked by hand."""

import json
import subprocess
import sys

import pytest
import torch

from train.config import PRESETS, TrainConfig, ConfigError, ffcv_ramp, preset_values
from train.models import build_model, resnet18, resnet50
from train.schedule import cyclic_rate


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_are_torchvisions():
    # torchvision's documented sizes of resnet18 and resnet50 at 1000 classes.
    assert count(resnet18()) == 11_689_512
    assert count(resnet50()) == 25_557_032
    assert count(resnet18(num_classes=10)) == 11_689_512 - 990 * 513


def test_state_dict_keys_and_shapes_are_torchvisions():
    # By hand from the architecture: ResNet-18 has 20 convolutions, 20 norms (3 buffers each) and
    # the fc: 20 + 20 * 2 + 2 parameters and 60 buffers; ResNet-50: 53 convolutions, 53 norms.
    small, large = resnet18().state_dict(), resnet50().state_dict()
    assert len(small) == 62 + 60 and len(large) == 161 + 159
    expected = {
        "conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.conv1.weight": (128, 64, 3, 3), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.num_batches_tracked": (), "layer4.1.bn2.bias": (512,), "fc.weight": (1000, 512),
    }
    assert {k: tuple(small[k].shape) for k in expected} == expected
    expected = {
        "layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.weight": (1024,), "layer4.2.conv3.weight": (2048, 512, 1, 1), "fc.weight": (1000, 2048),
    }
    assert {k: tuple(large[k].shape) for k in expected} == expected
    assert "layer1.0.downsample.0.weight" not in small and "layer3.6.conv1.weight" not in large


def test_the_stride_sits_on_the_3x3_and_any_side_from_32_works():
    model = resnet50(num_classes=7).eval()
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # v1.5
    with torch.no_grad():
        for side in (32, 160, 192):
            assert model(torch.zeros(1, 3, side, side)).shape == (1, 7)


def test_zero_init_residual_makes_every_block_start_as_its_shortcut():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, zero_init_residual=True).eval()
    block = model.layer1[0]  # identity shortcut: the block is relu(x) for x >= 0 inputs
    x = torch.rand(2, 64, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(x))
    assert all(not b.bn2.weight.detach().any() for layer in (model.layer1, model.layer4) for b in layer)
    assert resnet18().layer1[0].bn2.weight.detach().eq(1).all()  # off by default
    with pytest.raises(ConfigError, match="--zero-init-residual is for resnet18 and resnet50"):
        build_model("alexnet", 10, zero_init_residual=True)


def test_resolution_follows_ffcvs_rule():
    # FFCV's 16-epoch config: 160 until epoch 11, 192 from 13; epoch 12 is lerp 176 -> 32 * round(5.5) = 192.
    config = TrainConfig(arch="resnet18", crop_mode="random-resized", min_res=160, max_res=192,
                         ramp_start=11, ramp_end=13, epochs=16)
    assert [config.res_at(e) for e in range(16)] == [160] * 12 + [192] * 4
    wide = TrainConfig(arch="resnet18", crop_mode="random-resized", min_res=128, max_res=256, ramp_start=0, ramp_end=4)
    assert [wide.res_at(e) for e in range(6)] == [128, 160, 192, 224, 256, 256]  # lerp 160, 192, 224 exactly
    assert TrainConfig(arch="resnet18").res_at(5) == 224  # no ramp: the crop
    with pytest.raises(ConfigError, match="MIN <= MAX"):
        TrainConfig(arch="resnet18", min_res=192, max_res=160)


def test_the_ramp_follows_ffcvs_tables_and_scales_between_them():
    # rn50_configs/rn50_{16,24,32,40,56,88}_epochs.yaml: start_ramp, end_ramp.
    assert [ffcv_ramp(e) for e in (16, 24, 32, 40, 56, 88)] == [(11, 13), (17, 20), (23, 27), (29, 34), (41, 48),
                                                                 (65, 76)]
    # 20 epochs: halfway between 16's (11/16, 13/16) and 24's (17/24, 20/24) fractions of the run.
    assert ffcv_ramp(20) == (round(20 * (11 / 16 + 17 / 24) / 2), round(20 * (13 / 16 + 20 / 24) / 2)) == (14, 16)
    assert ffcv_ramp(4) == (3, 3) and ffcv_ramp(100) == (74, 86)  # outside the table: the nearest fractions
    values = preset_values("resnet50", {"epochs": 88})
    assert (values["ramp_start"], values["ramp_end"]) == (65, 76)
    assert preset_values("resnet50", {"ramp_start": 1, "ramp_end": 2})["ramp_start"] == 1  # given wins


def test_resnet_presets_are_ffcvs_configs():
    rn50, rn18 = PRESETS["resnet50"], PRESETS["resnet18"]
    assert (rn50["batch_size"], rn50["lr"], rn50["weight_decay"]) == (512 * 8, 1.7, 1e-4)
    assert (rn18["batch_size"], rn18["lr"], rn18["weight_decay"]) == (1024, 0.5, 5e-5)
    for preset in (rn50, rn18):
        assert (preset["min_res"], preset["max_res"], preset["label_smoothing"], preset["schedule"]) == (
            160, 192, 0.1, "cyclic")
        config = TrainConfig(**preset_values("resnet50" if preset is rn50 else "resnet18", {}))
        assert config.augment_spec("val").val_resize == 292 and config.augment_spec("train").val_resize is None
    result = subprocess.run([sys.executable, "-m", "train", "run", "--help"], capture_output=True, text=True,
                            timeout=60)
    text = " ".join(result.stdout.split())  # unwrapped
    assert "resnet50: crop_mode=random-resized" in text and "lr=1.7" in text and "--res-ramp START:END" in text


def test_cyclic_rate_is_ffcvs_triangle():
    # FFCV: np.interp(epoch, [0, peak, epochs], [1e-4 * lr, lr, 0]).
    assert cyclic_rate(0, 1.7, 2, 16) == pytest.approx(1.7e-4)
    assert cyclic_rate(1, 1.7, 2, 16) == pytest.approx((1.7e-4 + 1.7) / 2)
    assert cyclic_rate(2, 1.7, 2, 16) == pytest.approx(1.7)
    assert cyclic_rate(9, 1.7, 2, 16) == pytest.approx(1.7 * 7 / 14)
    assert cyclic_rate(16, 1.7, 2, 16) == 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_resnet18_run_with_a_resolution_ramp_learns_on_keep_shards(keep_shards, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "train", "run", str(keep_shards), "--arch", "resnet18", "--epochs", "4",
         "--crop-mode", "random-resized", "--res", "64:128", "--res-ramp", "0:2", "--crop", "128", "--val-resize", "146",
         "--batch-size", "16", "--lr", "0.05", "--schedule", "cyclic", "--lr-peak-epoch", "1", "--lighting", "0",
         "--normalize", "torchvision", "--zero-init-residual", "--device", "cpu", "--workers", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=380)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["res"] for row in rows] == [64, 96, 128, 128]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "config: " in result.stdout and "min_res=64" in result.stdout and "res 96" in result.stdout
