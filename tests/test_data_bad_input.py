"""Bad input for the image DataModules: corrupt / truncated files, odd modes, non-square and tiny images,
non-images, empty folders, split files naming missing images. Each case: converted, skipped with one
warning listing the files, or one clear error naming them and the config key."""
import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.celebahq import CelebAHQDataModule
from datamodules.ffhq import FFHQDataModule
from datamodules.folder import FolderDataModule
from datamodules.image_folder import DataError, ImageFolderDataModule, ImageFolderDataset, read_rgb

RNG = np.random.default_rng(0)


def png_bytes(size=(16, 16), fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def data_warnings(record, word):
    return [str(w.message) for w in record if word in str(w.message)]


def test_truncated_and_corrupt_files_are_skipped_with_one_warning_naming_each(tmp_path):
    write(tmp_path / "good.png", png_bytes())
    write(tmp_path / "good.jpg", png_bytes(fmt="JPEG"))
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")):
        data = png_bytes((64, 64), fmt=fmt)
        write(tmp_path / f"half.{ext}", data[: len(data) // 2])  # cut download: header fine, pixels missing
    write(tmp_path / "page.jpg", b"<!DOCTYPE html><html>404 Not Found</html>")  # a saved error page
    with pytest.warns(UserWarning) as record:
        ds = ImageFolderDataset(tmp_path, resolution=16)
    (message,) = data_warnings(record, "unreadable")
    assert "skipping 4 unreadable image file(s)" in message
    for part in ("half.jpg (truncated)", "half.png (truncated)", "half.webp", "page.jpg (not an image)"):
        assert part in message
    assert [p.name for p in ds.files] == ["good.jpg", "good.png"]


def test_corruption_inside_a_file_is_found_by_full_verification(tmp_path):
    write(tmp_path / "a.png", png_bytes())
    data = bytearray(png_bytes())
    data[len(data) // 2 : len(data) // 2 + 40] = bytes(40)  # damaged pixel data, intact end marker
    write(tmp_path / "b.png", bytes(data))
    assert len(ImageFolderDataset(tmp_path, 16)) == 2  # a header check cannot see it ...
    with pytest.warns(UserWarning, match=r"1 unreadable.*b\.png \(corrupt\)"):
        assert [p.name for p in ImageFolderDataset(tmp_path, 16, verify="full").files] == ["a.png"]
    unchecked = ImageFolderDataset(tmp_path, 16, verify="none")
    with pytest.raises(DataError, match=r"Cannot decode image .*b\.png.*data\.verify=full"):
        unchecked[1]  # ... and loading it names the file and the setting that would have caught it


def test_grayscale_16_bit_cmyk_and_alpha_images_are_converted_to_8_bit_rgb(tmp_path):
    gray16 = np.full((8, 8), 51400, np.uint16)  # 51400 / 257 = 200
    cv2.imwrite(str(tmp_path / "a_gray16.png"), gray16)
    rgb16 = np.zeros((8, 8, 3), np.uint16)
    rgb16[..., 2] = 65535  # cv2 writes BGR: this is red
    cv2.imwrite(str(tmp_path / "b_rgb16.png"), rgb16)
    Image.new("RGB", (8, 8), (0, 0, 255)).convert("CMYK").save(tmp_path / "c_cmyk.jpg", quality=100)
    Image.new("LA", (8, 8), (100, 0)).save(tmp_path / "d_la.png")  # gray + fully transparent alpha
    with pytest.warns(UserWarning) as record:
        ds = ImageFolderDataset(tmp_path, resolution=8)
    (alpha,) = data_warnings(record, "alpha channel")
    assert "1 image(s) have an alpha channel" in alpha and "d_la.png" in alpha
    values = {p.stem: read_rgb(p) for p in ds.files}
    assert all(v.dtype == np.uint8 and v.shape == (8, 8, 3) for v in values.values())
    assert (values["a_gray16"] == 200).all()
    assert (values["b_rgb16"] == (255, 0, 0)).all()
    assert np.abs(values["c_cmyk"].astype(int) - (0, 0, 255)).max() < 8
    assert (values["d_la"] == 100).all()
    torch.testing.assert_close(ds[0]["image"], torch.full((3, 8, 8), 200 / 127.5 - 1))


def test_exif_rotation_is_applied(tmp_path):
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, :10] = 255  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; displayed rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    image = read_rgb(tmp_path / "phone.jpg")
    assert image.shape == (30, 10, 3) and image[:8].mean() > 200 and image[-8:].mean() < 50  # white on top


def test_non_square_images_are_centre_cropped_with_one_warning_or_refused(tmp_path, make_images):
    make_images(tmp_path, ["square.png"], size=(16, 16))
    make_images(tmp_path, ["wide.png", "tall.jpg"], size=(24, 16))
    with pytest.warns(UserWarning) as record:
        ds = ImageFolderDataset(tmp_path, resolution=16)
    (message,) = data_warnings(record, "non-square")
    assert "2 non-square image(s) are centre-cropped" in message and "tall.jpg (24x16), wide.png (24x16)" in message
    assert "data.non_square=error" in message and ds[2]["image"].shape == (3, 16, 16)
    with pytest.raises(DataError, match=r"2 image\(s\) under .* are not square: tall\.jpg.*data\.non_square=crop"):
        ImageFolderDataset(tmp_path, resolution=16, non_square="error")
    with pytest.raises(DataError, match=r"data\.non_square must be one of crop, error"):
        ImageFolderDataModule(tmp_path, resolution=16, non_square="squash")


def test_images_smaller_than_the_resolution_are_upscaled_with_one_warning_or_refused(tmp_path, make_images):
    make_images(tmp_path, ["big.png"], size=(32, 32))
    make_images(tmp_path, ["tiny.png"], size=(4, 4))
    make_images(tmp_path, ["one_pixel.png"], size=(1, 1))
    with pytest.warns(UserWarning) as record:
        ds = ImageFolderDataset(tmp_path, resolution=16)
    (message,) = data_warnings(record, "smaller than")
    assert "2 image(s) smaller than the resolution 16 are upscaled" in message
    assert "one_pixel.png (1x1), tiny.png (4x4)" in message and "data.allow_upscale=false" in message
    assert all(ds[i]["image"].shape == (3, 16, 16) for i in range(3))
    with pytest.raises(DataError, match=r"2 image\(s\) under .* smaller than the resolution 16: one_pixel\.png.*"
                                        r"data\.allow_upscale=true"):
        ImageFolderDataset(tmp_path, resolution=16, allow_upscale=False)


def test_files_that_are_not_images_are_ignored_or_skipped(tmp_path, make_images):
    make_images(tmp_path, ["a.png"], size=(8, 8))
    (tmp_path / "LICENSE.txt").write_text("not an image")  # other extensions: never looked at
    (tmp_path / "ffhq-dataset-v2.json").write_text("{}")
    (tmp_path / "folder.png").mkdir()  # a directory with an image name is searched, not opened
    make_images(tmp_path / "folder.png", ["inside.png"], size=(8, 8))
    write(tmp_path / "notes.webp", b"RIFF\x00\x00\x00\x00WEBPjunk")
    with pytest.warns(UserWarning, match=r"1 unreadable image file\(s\): notes\.webp"):
        ds = ImageFolderDataset(tmp_path, resolution=8)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == ["a.png", "folder.png/inside.png"]


@pytest.mark.parametrize("module,extra", [(ImageFolderDataModule, {}), (FFHQDataModule, {}),
                                          (CelebAHQDataModule, {}), (FolderDataModule, {})])
def test_empty_folder_is_one_error_naming_it_and_data_root(tmp_path, module, extra):
    (tmp_path / "empty" / "00000").mkdir(parents=True)
    (tmp_path / "empty" / "README.md").write_text("nothing here")
    with pytest.raises(ValueError, match=r"empty contains no png/jpg/jpeg/webp images \(set data\.root="):
        module(tmp_path / "empty", resolution=8, **extra)
    with pytest.raises(FileNotFoundError, match=r"missing does not exist.*data\.root"):
        module(tmp_path / "missing", resolution=8, **extra)


def test_a_folder_of_only_broken_files_is_one_error_after_the_warning(tmp_path):
    write(tmp_path / "a.png", png_bytes()[:100])
    dm = FolderDataModule(tmp_path, resolution=8, batch_size=1)
    with pytest.warns(UserWarning, match=r"a\.png \(truncated\)"), pytest.raises(DataError, match=r"no readable image"):
        dm.setup("fit")


def test_split_file_naming_missing_images_is_an_error_or_one_warning(tmp_path, make_images):
    mapping = tmp_path / "image_list.txt"
    mapping.write_text("idx orig_idx orig_file\n" + "".join(f"{i} {i} {i + 1:06d}.jpg\n" for i in range(8)))
    partition = tmp_path / "list_eval_partition.txt"
    partition.write_text("".join(f"{i + 1:06d}.jpg {2 if i >= 4 else 0}\n" for i in range(8)))
    make_images(tmp_path / "hq", [f"{i}.jpg" for i in range(6)], size=(8, 8))  # test images 6 and 7 are missing
    args = dict(root=tmp_path / "hq", resolution=8, mapping_file=mapping, partition_file=partition, batch_size=2,
                val_split="none")
    dm = CelebAHQDataModule(**args)
    dm.setup("fit")  # training only needs the train split, which is complete ... the test split is not:
    with pytest.raises(DataError, match=r"test split names 2 image\(s\) that are not under .*hq \(data\.root\): "
                                        r"HQ indices 6, 7\..*data\.allow_missing=true"):
        dm.setup("test")
    lenient = CelebAHQDataModule(**args, allow_missing=True)
    with pytest.warns(UserWarning, match=r"Skipping 2 CelebA-HQ test image\(s\) missing from .*: HQ indices 6, 7"):
        lenient.setup("test")
    assert [item["name"] for item in lenient.test_set] == ["4", "5"]


def test_bad_settings_name_their_config_key(tmp_path, make_images):
    make_images(tmp_path, ["a.png", "b.png"], size=(8, 8))
    with pytest.raises(DataError, match=r"data\.verify must be one of none, header, full; got 'quick'"):
        ImageFolderDataModule(tmp_path, resolution=8, verify="quick")
    with pytest.raises(DataError, match=r"data\.val_split must be test, val or none"):
        CelebAHQDataModule(tmp_path, resolution=8, val_split="train")


def test_a_split_used_for_validation_and_test_is_checked_and_reported_once(tmp_path, make_images):
    make_images(tmp_path / "train", [f"{i}.png" for i in range(2)], size=(8, 8))
    make_images(tmp_path / "test", ["5.png"], size=(8, 8))
    make_images(tmp_path / "test", ["6.png"], size=(12, 8))
    dm = CelebAHQDataModule(tmp_path, resolution=8, batch_size=1)  # val_split=test
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
        dm.setup("test")
    assert len(data_warnings(record, "non-square")) == 1
    assert len(dm.val_set) == len(dm.test_set) == 2
