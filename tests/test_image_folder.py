"""ImageFolderDataset / ImageFolderDataModule on tiny image trees written to tmp_path."""
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.image_folder import ImageFolderDataModule, ImageFolderDataset, list_images


def save(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


def test_flat_folder_items_are_chw_float_tensors_in_range(tmp_path, make_images):
    make_images(tmp_path, ["b.png", "a.png", "c.jpg"], size=(40, 30))
    ds = ImageFolderDataset(tmp_path, resolution=16)
    assert [p.name for p in ds.files] == ["a.png", "b.png", "c.jpg"]
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert set(item) == {"image", "name"} and item["name"] == ["a", "b", "c"][i]
        x = item["image"]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < 0 < x.max()


def test_nested_ffhq_layout_found_recursively_sorted_and_filtered(tmp_path, make_images):
    names = ["01000/01000.png", "00000/00001.PNG", "00000/00000.png", "extra/deeper/x.webp", "y.JPEG"]
    make_images(tmp_path, names)
    (tmp_path / "LICENSE.txt").write_text("not an image")
    make_images(tmp_path, [".cache/hidden.png", "00000/.hidden.png"])
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["00000/00000.png", "00000/00001.PNG", "01000/01000.png", "extra/deeper/x.webp", "y.JPEG"]
    assert ImageFolderDataset(tmp_path, 8)[3]["image"].shape == (3, 8, 8)


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_become_rgb(tmp_path, make_images, mode):
    make_images(tmp_path, ["img.png"], size=(16, 16), mode=mode)
    x = ImageFolderDataset(tmp_path, resolution=16)[0]["image"]
    assert x.shape == (3, 16, 16)
    source = np.asarray(Image.open(tmp_path / "img.png"))
    expected = source if mode == "L" else source[..., 0]  # no resize at 16 px: exact values
    torch.testing.assert_close(x[0], torch.from_numpy(expected / 127.5 - 1).float(), atol=1e-5, rtol=0)
    if mode == "L":
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_palette_and_16_bit_images_load(tmp_path):
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).convert("P").save(tmp_path / "p.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "i16.png")
    ds = ImageFolderDataset(tmp_path, resolution=8)
    assert ds.files[0].name == "i16.png"
    torch.testing.assert_close(ds[0]["image"], torch.ones(3, 8, 8))
    assert ds[1]["image"].shape == (3, 8, 8)


def test_unreadable_files_skipped_with_one_warning_listing_them(tmp_path, make_images):
    make_images(tmp_path, ["good1.png", "sub/good2.jpg"])
    (tmp_path / "broken.png").write_bytes(b"definitely not a png")
    (tmp_path / "sub" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"2 unreadable.*broken\.png.*sub/empty\.jpg") as record:
        ds = ImageFolderDataset(tmp_path, resolution=8)
    assert len([w for w in record if "unreadable" in str(w.message)]) == 1
    assert [p.name for p in ds.files] == ["good1.png", "good2.jpg"]


def test_missing_empty_and_all_broken_folders_name_folder_and_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.*data\.root"):
        ImageFolderDataset(tmp_path / "missing", 8)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty contains no png/jpg/jpeg/webp images.*data\.root"):
        ImageFolderDataset(tmp_path / "empty", 8)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"broken has no readable image.*data\.root"):
        ImageFolderDataset(tmp_path / "broken", 8)


def test_value_mapping_downscale_antialiasing_and_centre_crop(tmp_path):
    save(tmp_path / "a_white.png", np.full((8, 8, 3), 255))
    save(tmp_path / "b_black.png", np.zeros((8, 8, 3)))
    checker = (np.indices((64, 64)).sum(0) % 2 * 255)[..., None].repeat(3, -1)
    save(tmp_path / "c_checker.png", checker)
    wide = np.zeros((20, 60, 3))
    wide[:, :20, 2], wide[:, 20:40, 1], wide[:, 40:, 0] = 255, 255, 255  # blue | green | red
    save(tmp_path / "d_wide.png", wide)
    ds = ImageFolderDataset(tmp_path, resolution=16)
    torch.testing.assert_close(ds[0]["image"], torch.ones(3, 16, 16))  # upscaled constant stays exact
    torch.testing.assert_close(ds[1]["image"], -torch.ones(3, 16, 16))
    # INTER_AREA averages each 4x4 block of the checkerboard to mid-grey; nearest would give +-1
    assert ds[2]["image"].abs().max() < 0.02
    centre = ds[3]["image"]  # short side 20 -> 16, width 60 -> 48, centre 16 columns = the green third
    assert centre.shape == (3, 16, 16)
    assert (centre[1] > 0.9).all() and (centre[0] < -0.9).all() and (centre[2] < -0.9).all()


def test_flip_is_random_follows_torch_seed_and_can_be_switched_off(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 16), (16, 1))[..., None].repeat(3, -1)
    save(tmp_path / "ramp.png", ramp)
    ds = ImageFolderDataset(tmp_path, resolution=16, flip=True)

    def orientations():
        return [bool(ds[0]["image"][0, 0, 0] > 0) for _ in range(24)]  # True: bright on the left (mirrored)

    torch.manual_seed(0)
    first = orientations()
    torch.manual_seed(0)
    assert orientations() == first
    assert any(first) and not all(first)
    plain = ds.with_flip(False)
    assert plain.files is ds.files
    assert all(plain[0]["image"][0, 0, 0] < 0 for _ in range(8))


def make_dm(root, **kwargs):
    opts = dict(root=root, resolution=8, batch_size=3, num_workers=0, flip=False, seed=0)
    opts.update(kwargs)
    dm = ImageFolderDataModule(**opts)
    dm.setup("fit")
    return dm


def test_datamodule_split_is_deterministic_disjoint_and_complete(tmp_path, make_images):
    make_images(tmp_path, [f"{i:02d}.png" for i in range(10)], size=(8, 8))
    dm = make_dm(tmp_path, val_count=3)
    train, val = list(dm.train_set.indices), list(dm.val_set.indices)
    assert len(train) == 7 and len(val) == 3
    assert sorted(train + val) == list(range(10))
    assert val == list(make_dm(tmp_path, val_count=3).val_set.indices)
    other = [list(make_dm(tmp_path, val_count=3, seed=s).val_set.indices) for s in (1, 2, 3)]
    assert any(v != val for v in other)
    assert len(make_dm(tmp_path, val_fraction=0.2).val_set) == 2
    assert len(make_dm(tmp_path).val_set) == 0
    assert make_dm(tmp_path).hparams.root == str(tmp_path)  # a Path becomes a plain str (checkpoint-safe)


def test_datamodule_loaders_batches_drop_last_and_no_val_flip(tmp_path, make_images):
    make_images(tmp_path, [f"{i:02d}.png" for i in range(10)], size=(8, 8))
    dm = make_dm(tmp_path, val_count=2, flip=True)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 8 training images, batch 3, last incomplete batch dropped
    assert all(b["image"].shape == (3, 3, 8, 8) and b["image"].dtype == torch.float32 and len(b["name"]) == 3
               for b in batches)
    val = list(dm.val_dataloader())
    assert [b["image"].shape[0] for b in val] == [2]
    assert dm.val_set.dataset.flip is False and dm.train_set.dataset.flip is True
    torch.testing.assert_close(torch.cat([b["image"] for b in dm.val_dataloader()]), val[0]["image"])  # fixed order, no randomness


def test_datamodule_errors_name_the_config_keys(tmp_path, make_images):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*data\.root"):
        ImageFolderDataModule(root=tmp_path / "nowhere", resolution=8)
    make_images(tmp_path, ["a.png", "b.png"], size=(8, 8))
    with pytest.raises(ValueError, match=r"data\.batch_size=4.*2 training images"):
        make_dm(tmp_path, batch_size=4)
    with pytest.raises(ValueError, match=r"none left to train"):
        make_dm(tmp_path, val_count=2)
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        ImageFolderDataModule(root=tmp_path, resolution=8, val_fraction=1.0)
