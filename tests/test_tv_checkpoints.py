"""Every torchvision classification model's state dict, saved the way users save it
(`torch.save(model.state_dict())`), loads into the architecture caproj builds for it: the
same tensors, its `_metadata` (layer versions) kept, auxiliary heads fitted to the keys."""

from __future__ import annotations

import pytest
import torch
import torchvision

from caproj.models import load_model

# Built at 10 classes; the largest (hundreds of millions of parameters) take minutes to
# build and gigabytes to save, so CI loads those from the same family's smallest member.
TOO_BIG = 150e6
NAMES = torchvision.models.list_models(module=torchvision.models)


def _params(name: str) -> int:
    """The parameter count torchvision's weights record (1,000 classes): known without
    building the model."""
    return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_as_users_save_it_loads(name, tmp_path):
    if _params(name) > TOO_BIG:
        pytest.skip(f"{name}: over {TOO_BIG / 1e6:.0f} M parameters (its family's smaller "
                    f"members cover the layout)")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    loaded, _ = load_model(path, arch=f"tv:{name}")
    sd, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(sd)
    for k, v in sd.items():  # (MNASNet's loader reads _metadata: it fails without it)
        assert torch.equal(got[k], v), k
