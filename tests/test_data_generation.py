"""The generation setup's paper-scale sets (CIFAR-100 original, CelebA restricted, 32 px) read from tiny
local copies in torchvision's exact on-disk formats. Only torchvision's md5 constants are swapped for the tiny
files' own md5s; its parsing and loading run for real."""

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR100, CelebA

from sophon_ray.core.data import DatasetNotFound, labels_of, load_domain
from sophon_ray.core.datasets import CELEBA_CROP
from sophon_ray.spec import DomainSpec

RGB = dict(image_size=32, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
ATTRIBUTES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
              "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
              "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
              "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
              "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ CIFAR-100
def write_cifar100(root: Path, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    """cifar-100-python/{train,test,meta} as the real archive pickles them: uint8 rows of 3072 (R, G, B planes
    of 32 x 32), fine and coarse labels; returns the images [N, 32, 32, 3] and labels written."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for part, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        entry = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{part}ing batch 1 of 1",
                 "fine_labels": fine, "coarse_labels": [f // 5 for f in fine],
                 "data": images.transpose(0, 3, 1, 2).reshape(n, 3072)}
        (folder / part).write_bytes(pickle.dumps(entry))
        written[f"{part}_images"], written[f"{part}_labels"] = images, np.array(fine)
    meta = {"fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return written


@pytest.fixture
def tiny_cifar100(tmp_path, monkeypatch):
    written = write_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5(folder / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5(folder / "meta")})
    return tmp_path, written


def test_cifar100_reads_the_real_pickle_format_into_minus_one_to_one(tiny_cifar100):
    root, written = tiny_cifar100
    train, test = load_domain(DomainSpec(dataset="cifar100", root=str(root), **RGB))
    assert len(train) == 6 and len(test) == 4
    x, y = train[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = torch.from_numpy(written["train_images"][2]).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.allclose(x, expected, atol=1e-6)  # 32 px in, 32 px out: exactly the stored pixels, scaled
    assert y == written["train_labels"][2]
    assert labels_of(test).tolist() == written["test_labels"].tolist()
    smaller, _ = load_domain(DomainSpec(dataset="cifar100", root=str(root), train_size=3, **RGB))
    assert len(smaller) == 3


def test_cifar100_missing_or_corrupt_files_name_the_root_and_the_fix(tmp_path, tiny_cifar100):
    with pytest.raises(DatasetNotFound, match=r"cifar100: no data under .*nowhere.*download: true.*cifar-100-python"):
        load_domain(DomainSpec(dataset="cifar100", root=str(tmp_path / "nowhere"), **RGB))
    root, _ = tiny_cifar100
    with (root / "cifar-100-python" / "test").open("ab") as f:
        f.write(b"x")  # the md5 no longer matches
    with pytest.raises(DatasetNotFound, match="corrupted"):
        load_domain(DomainSpec(dataset="cifar100", root=str(root), **RGB))


# --------------------------------------------------------------------------------------------- CelebA
# (file, partition 0 train / 1 valid / 2 test, identity, Male, Smiling, colour of the face area)
CELEBA_ROWS = [("000001.jpg", 0, 2880, 0, 1, (0, 0, 255)), ("000002.jpg", 0, 2937, 1, 0, (0, 255, 0)),
               ("000003.jpg", 0, 8692, 1, 1, (0, 0, 255)), ("000004.jpg", 1, 5805, 0, 0, (0, 255, 0)),
               ("000005.jpg", 2, 9295, 1, 1, (0, 255, 0)), ("000006.jpg", 2, 4153, 0, 0, (0, 0, 255))]


def write_celeba(root: Path) -> None:
    """celeba/ as torchvision expects it after unzipping: img_align_celeba/*.jpg (178 wide, 218 tall) and the
    five annotation files in their published layouts (space separated; the attribute, bbox and landmark lists
    start with a count line and a header line; attributes are -1/1). Every image is a coloured face area with
    20 red rows above and below: the rows the 178 x 178 centre crop removes."""
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    for name, *_, colour in CELEBA_ROWS:
        pixels = np.zeros((218, 178, 3), np.uint8)
        pixels[:, :] = colour
        pixels[:20], pixels[-20:] = (255, 0, 0), (255, 0, 0)
        Image.fromarray(pixels).save(folder / "img_align_celeba" / name, quality=95)
    n = len(CELEBA_ROWS)
    (folder / "list_eval_partition.txt").write_text("".join(f"{r[0]} {r[1]}\n" for r in CELEBA_ROWS))
    (folder / "identity_CelebA.txt").write_text("".join(f"{r[0]} {r[2]}\n" for r in CELEBA_ROWS))
    attr_lines = []
    for name, _, _, male, smiling, _ in CELEBA_ROWS:
        values = [-1] * len(ATTRIBUTES)
        values[ATTRIBUTES.index("Male")] = 1 if male else -1
        values[ATTRIBUTES.index("Smiling")] = 1 if smiling else -1
        values[ATTRIBUTES.index("Young")] = 1
        attr_lines.append(f"{name} " + " ".join(f"{v:2d}" for v in values) + "\n")
    (folder / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(ATTRIBUTES) + " \n" + "".join(attr_lines))
    (folder / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(f"{r[0]}    95  71 226 313\n" for r in CELEBA_ROWS))
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x "
        "rightmouth_y\n" + "".join(f"{r[0]}    69  109  106  113   77  142   73  152  108  154\n" for r in CELEBA_ROWS))


@pytest.fixture
def tiny_celeba(tmp_path, monkeypatch):
    write_celeba(tmp_path)
    folder = tmp_path / "celeba"
    monkeypatch.setattr(CelebA, "file_list", [
        (file_id, md5(folder / name) if (folder / name).exists() else digest, name)
        for file_id, digest, name in CelebA.file_list])  # the zip's md5 is never checked (it may be deleted)
    return tmp_path


def test_celeba_partitions_labels_crop_and_range(tiny_celeba):
    train, test = load_domain(DomainSpec(dataset="celeba", root=str(tiny_celeba), **RGB))
    assert len(train) == 3 and len(test) == 2  # partition 1 (valid) is in neither
    expected = {"train": [1, 2, 3], "test": [3, 0]}  # 2 * Male + Smiling
    assert labels_of(train).tolist() == expected["train"] and labels_of(test).tolist() == expected["test"]
    for i, (x, y) in enumerate([train[k] for k in range(3)]):
        assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
        assert y == expected["train"][i] and isinstance(y, int)
        colour = torch.tensor(CELEBA_ROWS[i][-1], dtype=torch.float32) / 255 * 2 - 1
        # the centre crop removed the red rows: every pixel is the face colour (up to JPEG's rounding)
        assert (x - colour.view(3, 1, 1)).abs().max() < 0.1, (x.mean(dim=(1, 2)), colour)
    assert CELEBA_CROP == 178
    for image in (tiny_celeba / "celeba" / "img_align_celeba").iterdir():
        image.unlink()
    assert labels_of(train).tolist() == expected["train"]  # from the attribute list, not by reading images


def test_celeba_caps_grey_and_missing_root(tiny_celeba, tmp_path):
    capped, _ = load_domain(DomainSpec(dataset="celeba", root=str(tiny_celeba), train_size=2, **RGB))
    assert len(capped) == 2 and set(labels_of(capped).tolist()) <= {1, 2, 3}
    grey, _ = load_domain(DomainSpec(dataset="celeba", root=str(tiny_celeba), image_size=16, channels=1))
    assert grey[0][0].shape == (1, 16, 16)
    with pytest.raises(DatasetNotFound, match=r"celeba: no data under .*nowhere.*download: true.*img_align_celeba"):
        load_domain(DomainSpec(dataset="celeba", root=str(tmp_path / "nowhere"), **RGB))
