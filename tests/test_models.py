"""The models against the paper's numbers and against hand-written references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.models import MODELS, AlexNet, AlexNetOWT, UnknownArch, build_model, torchvision_names


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    # The paper's AlexNet: 34,944 + 307,456 + 885,120 + 663,936 + 442,624 (convolutions, conv2/4/5
    # in two columns) + 37,752,832 + 16,781,312 + 4,097,000 (fully connected) = 60,965,224.
    assert count(AlexNet(1000)) == 60_965_224
    assert count(AlexNetOWT(1000)) == 61_100_840  # torchvision's alexnet
    assert count(AlexNet(10)) == 60_965_224 - 990 * 4097


def test_shapes_of_the_paper():
    model = AlexNet(1000).eval()
    x = torch.zeros(2, 3, 224, 224)
    shapes = {}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc8"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    assert model(x).shape == (2, 1000)
    assert shapes == {"conv1": (2, 96, 55, 55), "conv2": (2, 256, 27, 27), "conv3": (2, 384, 13, 13),
                      "conv4": (2, 384, 13, 13), "conv5": (2, 256, 13, 13), "fc6": (2, 4096), "fc8": (2, 1000)}
    # Two columns: conv2, conv4 and conv5 see half of their input maps.
    assert model.conv2.weight.shape == (256, 48, 5, 5)
    assert model.conv3.weight.shape == (384, 256, 3, 3)
    assert model.conv4.weight.shape == (384, 192, 3, 3) and model.conv5.weight.shape == (256, 192, 3, 3)
    assert AlexNetOWT(7)(x).shape == (2, 7)


def test_paper_initialisation():
    torch.manual_seed(0)
    model = AlexNet(1000)
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        weight = getattr(model, name).weight
        assert abs(weight.mean().item()) < 1e-3 and weight.std().item() == pytest.approx(0.01, rel=0.05), name
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert (getattr(model, name).bias == 1).all(), name
    for name in ("conv1", "conv3", "fc8"):
        assert (getattr(model, name).bias == 0).all(), name


def test_lrn_is_the_papers_formula():
    # b_i = a_i / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2)^beta, k=2, n=5, alpha=1e-4, beta=0.75
    a = torch.randn(2, 96, 5, 5, generator=torch.Generator().manual_seed(0)) * 30
    got = AlexNet().norm1(a).numpy()
    x = a.numpy().astype(np.float64)
    expected = np.empty_like(x)
    for i in range(96):
        window = (x[:, max(0, i - 2) : min(96, i + 3)] ** 2).sum(axis=1)
        expected[:, i] = x[:, i] / (2 + 1e-4 * window) ** 0.75
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def owt_reference(state: dict, x: torch.Tensor) -> torch.Tensor:
    """AlexNet-OWT written out from its weights (torchvision's layout), eval mode."""
    def conv(x, name, **kw):
        return F.relu(F.conv2d(x, state[f"features.{name}.weight"], state[f"features.{name}.bias"], **kw))

    x = F.max_pool2d(conv(x, 0, stride=4, padding=2), 3, 2)
    x = F.max_pool2d(conv(x, 3, padding=2), 3, 2)
    x = conv(conv(conv(x, 6, padding=1), 8, padding=1), 10, padding=1)
    x = F.adaptive_avg_pool2d(F.max_pool2d(x, 3, 2), 6).flatten(1)
    x = F.relu(F.linear(x, state["classifier.1.weight"], state["classifier.1.bias"]))
    x = F.relu(F.linear(x, state["classifier.4.weight"], state["classifier.4.bias"]))
    return F.linear(x, state["classifier.6.weight"], state["classifier.6.bias"])


def test_alexnet_owt_matches_its_reference_and_torchvision_keys():
    torch.manual_seed(1)
    model = AlexNetOWT(1000).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), owt_reference(model.state_dict(), x), rtol=1e-4, atol=1e-5)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert keys["features.0.weight"] == (64, 3, 11, 11) and keys["classifier.6.weight"] == (1000, 4096)
    if torchvision_names():  # with a working torchvision, its published layout must load as is
        import torchvision

        reference = torchvision.models.alexnet()
        model.load_state_dict(reference.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference.eval()(x))


def test_build_model_by_name_and_import_path():
    assert set(MODELS) >= {"alexnet", "alexnet-owt"}
    assert isinstance(build_model("alexnet-owt", 5), AlexNetOWT)
    assert build_model("tiny_models:tiny", 3).fc.out_features == 3
    with pytest.raises(UnknownArch, match="unknown --arch 'resnet9000': use alexnet, alexnet-owt"):
        build_model("resnet9000", 10)
    with pytest.raises(UnknownArch, match="cannot import --arch nowhere.mod:net"):
        build_model("nowhere.mod:net", 10)


@pytest.mark.slow
def test_overfits_one_small_batch():
    # Dropout off so that the batch can be memorised; Adam because the point is that gradients
    # reach every layer, not the paper's slow start (its N(0, 0.01) init, see the README).
    torch.manual_seed(0)
    model = build_model("alexnet-owt", 4)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    x, y = torch.randn(8, 3, 64, 64), torch.arange(8) % 4
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(18):  # below a tenth from step 14 (57M parameters: each step costs most of a second)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::5]
