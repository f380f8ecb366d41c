import numpy as np
import pytest
import torch
from PIL import Image

from mixrank.compress import MixrankError, image_folder


@pytest.fixture
def model():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def photos():
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea(), np.stack([data.camera()] * 3, -1)]


def test_flat_folder_with_a_corrupt_file(tmp_path, photos, model):
    for i, p in enumerate(photos):
        _save(tmp_path / f"img{i}.png", p)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    out = image_folder(tmp_path, model, batch_size=3)
    assert len(out.files) == 4 and len(out.skipped) == 1
    assert "broken.jpg" in out.skipped[0][0]
    assert [tuple(b.shape) for b in out.batches] == [(3, 3, 224, 224), (1, 3, 224, 224)]
    assert out.labels is None
    # the model's own normalisation: roughly zero-centred values, not raw [0, 1] pixels
    x = torch.cat(out.batches)
    assert x.min() < -0.5 and x.max() > 0.5


def test_class_tree_count_and_seed(tmp_path, photos, model):
    for i, p in enumerate(photos):
        _save(tmp_path / ("cats" if i % 2 else "dogs") / f"{i}.jpg", p)
    a = image_folder(tmp_path, model, count=3, seed=1)
    b = image_folder(tmp_path, model, count=3, seed=1)
    c = image_folder(tmp_path, model, count=3, seed=2)
    assert a.classes == ["cats", "dogs"] and len(a.files) == 3
    assert a.files == b.files and torch.equal(a.batches[0], b.batches[0])
    assert sorted(set(a.files) | set(c.files)) != sorted(a.files) or a.files != c.files
    assert all(("cats" in f) == (lab == 0) for f, lab in zip(a.files, a.labels, strict=True))


def test_no_usable_image(tmp_path, model):
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(MixrankError, match="no usable image.*1 unreadable"):
        image_folder(tmp_path, model)
    with pytest.raises(MixrankError, match="does not exist"):
        image_folder(tmp_path / "nope", model)
