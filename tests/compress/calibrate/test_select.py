import pytest
import torch

from mixrank.compress import MixrankError, select_layers


def test_default_selection_on_timm_vit(tiny_vit):
    names = select_layers(tiny_vit)
    expected = [f"blocks.{i}.{s}" for i in range(2)
                for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert names == expected


def test_head_can_be_included(tiny_vit):
    names = select_layers(tiny_vit, include=["blocks.*", "head"])
    assert names[-1] == "head" and len(names) == 9


def test_exclude_glob(tiny_vit):
    names = select_layers(tiny_vit, exclude=["*.attn.*"])
    assert all("attn" not in n for n in names) and len(names) == 4


def test_pattern_matching_nothing_lists_close_matches(tiny_vit):
    with pytest.raises(MixrankError, match=r"matches no Linear layer.*did you mean"):
        select_layers(tiny_vit, include=["blocks.*.mlp.fc3"])


def test_model_without_linear():
    with pytest.raises(MixrankError, match="no nn.Linear"):
        select_layers(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))


def test_nothing_selected(tiny_vit):
    with pytest.raises(MixrankError, match="no Linear layer selected"):
        select_layers(tiny_vit, exclude=["blocks.*"])
