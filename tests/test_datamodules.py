"""FFHQ / CelebA-HQ / folder / SynthFaces DataModules on tiny fake trees in tmp dirs, and their Hydra configs."""
import io
import json
import sys
import warnings

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from datamodules.celebahq import (
    CelebAHQDataModule,
    celebahq_splits,
    index_by_number,
    read_celeba_partition,
    read_celebahq_mapping,
)
from datamodules.ffhq import FFHQDataModule, resolve_ffhq_folder
from datamodules.folder import FolderDataModule
from datamodules.image_folder import list_images
from datamodules.synthfaces import FACTORS
from datamodules.synthfaces_datamodule import SynthFacesDataModule, SynthFacesEvalDataset

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore:.*non-square")]


def ffhq_tree(root, make_images, n=12, nested=True):
    names = [f"{i // 5 * 5:05d}/{i:05d}.png" if nested else f"{i:05d}.png" for i in range(n)]
    make_images(root, names, size=(16, 16))
    return names


def weights_only_roundtrip(hparams):
    buffer = io.BytesIO()
    torch.save(dict(hparams), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- FFHQ -------------------------------------------------------------------------------------------

def test_ffhq_finds_both_official_layouts_and_prefers_the_aligned_1024_folder(tmp_path, make_images):
    ffhq_tree(tmp_path / "flat", make_images, nested=False)
    assert resolve_ffhq_folder(tmp_path / "flat") == tmp_path / "flat"
    repo = tmp_path / "ffhq"
    ffhq_tree(repo / "images1024x1024", make_images)
    ffhq_tree(repo / "thumbnails128x128", make_images)
    make_images(repo / "in-the-wild-images", ["00000.png"], size=(30, 20))
    (repo / "ffhq-dataset-v2.json").write_text("{}")
    assert resolve_ffhq_folder(repo) == repo / "images1024x1024"
    assert resolve_ffhq_folder(repo, "thumbnails128x128") == repo / "thumbnails128x128"
    assert resolve_ffhq_folder(repo / "images1024x1024") == repo / "images1024x1024"
    dm = FFHQDataModule(repo, resolution=8, batch_size=4, val_count=3)
    dm.setup("fit")
    assert len(dm.train_set) == 12
    assert all(p.parent.parent.name == "images1024x1024" for p in dm.train_set.dataset.files)
    with pytest.raises(FileNotFoundError, match=r"no sub-folder 'nope' \(data\.subfolder"):
        resolve_ffhq_folder(repo, "nope")
    make_images(tmp_path / "wild" / "in-the-wild-images", ["00000.png"])
    with pytest.raises(ValueError, match=r"only FFHQ's unaligned in-the-wild-images"):
        FFHQDataModule(tmp_path / "wild", resolution=8)


def test_ffhq_trains_on_all_and_validates_on_the_last_slice(tmp_path, make_images):
    ffhq_tree(tmp_path, make_images, n=12)
    dm = FFHQDataModule(tmp_path, resolution=8, batch_size=4, val_count=3, flip=True)
    dm.setup("fit")
    assert list(dm.train_set.indices) == list(range(12))
    assert list(dm.val_set.indices) == [9, 10, 11]
    assert [dm.val_set.dataset.name(i) for i in dm.val_set.indices] == ["00005/00009", "00010/00010", "00010/00011"]
    assert dm.val_set.dataset.flip is False and dm.train_set.dataset.flip is True
    held = FFHQDataModule(tmp_path, resolution=8, batch_size=4, val_count=3, val_in_train=False)
    held.setup("fit")
    assert list(held.train_set.indices) == list(range(9))
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "name"} and batch["image"].shape == (4, 3, 8, 8)  # one batch shape everywhere
    test = next(iter(dm.test_dataloader()))
    assert test["name"] == ["00005/00009", "00010/00010", "00010/00011"] and test["image"].shape == (3, 3, 8, 8)
    assert weights_only_roundtrip(dm.hparams)["root"] == str(tmp_path)


def test_ffhq_warns_when_the_image_count_is_not_the_expected_one(tmp_path, make_images):
    ffhq_tree(tmp_path, make_images, n=6)
    dm = FFHQDataModule(tmp_path, resolution=8, batch_size=2, val_count=1, expected_count=70000)
    with pytest.warns(UserWarning, match=r"holds 6 usable images, not 70000.*data\.expected_count"):
        dm.setup("fit")


def test_ffhq_resizes_1024_style_images_with_antialiasing(tmp_path):
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(np.repeat(checker[..., None], 3, -1)).save(tmp_path / "00000.png")
    Image.fromarray(np.repeat(checker[..., None], 3, -1)).save(tmp_path / "00001.png")
    dm = FFHQDataModule(tmp_path, resolution=16, batch_size=1, val_count=1)
    dm.setup("fit")
    assert dm.train_set[0]["image"].abs().max() < 0.02  # area averaging: mid-grey, no aliasing


# --- CelebA-HQ ----------------------------------------------------------------------------------------

# 10 HQ images; CelebA partition of their source files: 0 train, 1 val, 2 test
ORIG = [f"{j:06d}.jpg" for j in (5, 17, 3, 101, 88, 64, 7, 202, 150, 9)]
PART = {"000005.jpg": 0, "000017.jpg": 2, "000003.jpg": 0, "000101.jpg": 1, "000088.jpg": 2, "000064.jpg": 0,
        "000007.jpg": 0, "000202.jpg": 2, "000150.jpg": 1, "000009.jpg": 0, "000001.jpg": 0, "000002.jpg": 2}
EXPECTED = {"train": [0, 2, 5, 6, 9], "val": [3, 8], "test": [1, 4, 7]}


def celeba_files(tmp_path, header=True, csv=False):
    rows = [f"{i:<7d} {1000 + i:<10d} {f:<12s} md5a md5b" for i, f in enumerate(ORIG)]
    mapping = tmp_path / "image_list.txt"
    head = "idx     orig_idx    orig_file   proc_md5    final_md5\n" if header else ""
    mapping.write_text(head + "\n".join(rows) + "\n")
    partition = tmp_path / ("list_eval_partition.csv" if csv else "list_eval_partition.txt")
    lines = [f"{f},{p}" if csv else f"{f} {p}" for f, p in sorted(PART.items())]
    partition.write_text(("image_id,partition\n" if csv else "") + "\n".join(lines) + "\n")
    return mapping, partition


@pytest.mark.parametrize("header,csv", [(True, False), (False, True)])
def test_celebahq_split_from_mapping_and_partition_files(tmp_path, header, csv):
    mapping, partition = celeba_files(tmp_path, header, csv)
    assert read_celebahq_mapping(mapping)[3] == "000101.jpg"
    assert read_celeba_partition(partition)["000017.jpg"] == 2
    assert celebahq_splits(mapping, partition) == EXPECTED


def test_celebahq_file_errors_name_the_file_line_and_key(tmp_path):
    mapping, partition = celeba_files(tmp_path)
    bad = tmp_path / "bad_partition.txt"
    bad.write_text("000005.jpg 0\n000017.jpg seven\n")
    with pytest.raises(ValueError, match=r"bad_partition\.txt line 2 \(data\.partition_file\)"):
        read_celeba_partition(bad)
    short = tmp_path / "short_partition.txt"
    short.write_text("000005.jpg 0\n")
    with pytest.raises(ValueError, match=r"9 CelebA file\(s\) of .*image_list\.txt are not in .*short_partition"):
        celebahq_splits(mapping, short)
    with pytest.raises(FileNotFoundError, match=r"data\.mapping_file"):
        read_celebahq_mapping(tmp_path / "missing.txt")


def test_celebahq_images_are_matched_by_their_number_in_any_naming(tmp_path, make_images):
    names = ["0.jpg", "00001.png", "imgHQ00002.png", "sub/3.jpg", "readme.png"]
    make_images(tmp_path, names, size=(8, 8))
    index = index_by_number(list_images(tmp_path), tmp_path)
    assert {i: p.relative_to(tmp_path).as_posix() for i, p in index.items()} == {
        0: "0.jpg", 1: "00001.png", 2: "imgHQ00002.png", 3: "sub/3.jpg"}
    make_images(tmp_path, ["00003.png"], size=(8, 8))
    with pytest.raises(ValueError, match=r"1 CelebA-HQ index\(es\) have more than one image.*00003\.png / sub/3\.jpg"):
        index_by_number(list_images(tmp_path), tmp_path)


def test_celebahq_datamodule_with_split_files_trains_validates_and_tests_on_the_right_images(tmp_path, make_images):
    mapping, partition = celeba_files(tmp_path)
    make_images(tmp_path / "CelebA-HQ-img", [f"{i}.jpg" for i in range(10)], size=(16, 16))
    dm = CelebAHQDataModule(tmp_path / "CelebA-HQ-img", resolution=8, mapping_file=str(mapping),
                            partition_file=str(partition), batch_size=2)
    dm.setup("fit")
    assert [p.stem for p in dm.train_set.files] == ["0", "2", "5", "6", "9"]
    assert [p.stem for p in dm.val_set.files] == ["1", "4", "7"]  # val_split=test, as e4e / pSp
    assert dm.train_set.flip and not dm.val_set.flip
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "name"} and batch["image"].shape == (2, 3, 8, 8)
    test = [b for b in dm.test_dataloader()]
    assert [n for b in test for n in b["name"]] == ["1", "4", "7"]
    assert next(iter(dm.predict_dataloader()))["name"] == test[0]["name"]
    val = CelebAHQDataModule(tmp_path / "CelebA-HQ-img", resolution=8, mapping_file=mapping, partition_file=partition,
                             batch_size=2, val_split="val")
    val.setup("fit")
    assert [p.stem for p in val.val_set.files] == ["3", "8"]
    params = weights_only_roundtrip(val.hparams)
    assert params["mapping_file"] == str(mapping) and params["root"] == str(tmp_path / "CelebA-HQ-img")


def test_celebahq_needs_both_split_files(tmp_path, make_images):
    mapping, _ = celeba_files(tmp_path)
    make_images(tmp_path / "img", ["0.jpg"], size=(8, 8))
    with pytest.raises(ValueError, match=r"needs both data\.mapping_file.*data\.partition_file is not set"):
        CelebAHQDataModule(tmp_path / "img", resolution=8, mapping_file=mapping)


def test_celebahq_split_folders_and_a_folder_that_is_the_split(tmp_path, make_images):
    make_images(tmp_path / "split" / "train", [f"{i}.png" for i in range(4)], size=(8, 8))
    make_images(tmp_path / "split" / "test", ["28000.png", "28001.png"], size=(8, 8))
    dm = CelebAHQDataModule(tmp_path / "split", resolution=8, batch_size=2)
    dm.setup("fit")
    assert len(dm.train_set) == 4 and len(dm.val_set) == 2
    assert next(iter(dm.test_dataloader()))["name"] == ["28000", "28001"]
    only_test = CelebAHQDataModule(tmp_path / "split" / "test", resolution=8, batch_size=1)
    assert next(iter(only_test.test_dataloader()))["name"] == ["28000"]
    assert len(only_test.test_set) == 2
    no_train = tmp_path / "no_train"
    make_images(no_train / "test", ["1.png"], size=(8, 8))
    with pytest.raises(FileNotFoundError, match=r"has test/ but no train/ sub-folder"):
        CelebAHQDataModule(no_train, resolution=8, batch_size=1).setup("fit")


# --- folder -------------------------------------------------------------------------------------------

def test_folder_of_photos_predicts_every_photo_by_name(tmp_path, make_images):
    make_images(tmp_path / "photos", ["b.jpg", "a.png", "trip/c.jpeg"], size=(30, 20))
    dm = FolderDataModule(tmp_path / "photos", resolution=8, batch_size=2)
    batches = list(dm.predict_dataloader())
    assert [n for b in batches for n in b["name"]] == ["a", "b", "trip/c"]
    assert batches[0]["image"].shape == (2, 3, 8, 8)
    assert not (tmp_path / "photos_aligned8").exists()  # no alignment unless asked


def test_folder_with_masks_gives_every_split_its_ood_masks_cropped_like_the_image(tmp_path, make_images):
    make_images(tmp_path / "photos", ["a.png", "b.png", "sub/c.png", "d.png"], size=(24, 16))  # 24 wide, 16 high
    masks = tmp_path / "masks"
    mask = np.zeros((16, 24), np.uint8)
    mask[:, :12] = 255  # the left half of the photo is OOD
    (masks / "sub").mkdir(parents=True)
    Image.fromarray(mask).save(masks / "a.png")
    Image.fromarray(mask[::2, ::2]).save(masks / "sub" / "c.png")  # half size: resized to the photo first
    (masks / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    dm = FolderDataModule(tmp_path / "photos", resolution=8, batch_size=4, masks=str(masks), flip=False)
    with pytest.warns(UserWarning, match=r"cannot read the ground-truth mask .*d\.png"):
        batch = next(iter(dm.predict_dataloader()))
    assert batch["name"] == ["a", "b", "d", "sub/c"] and batch["ood_mask"].shape == (4, 1, 8, 8)
    expected = torch.zeros(1, 8, 8)
    expected[..., :4] = 1  # 24x16 -> 12x8, centre 8 columns = columns 2..9 of 12; OOD were columns 0..5
    for i in (0, 3):
        assert torch.equal(batch["ood_mask"][i], expected), batch["name"][i]
    assert batch["ood_mask"][1].isnan().all() and batch["ood_mask"][2].isnan().all()  # no mask / unreadable: unknown
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = next(iter(dm.train_dataloader()))
    assert set(train) == {"image", "name", "ood_mask"}
    plain = next(iter(FolderDataModule(tmp_path / "photos", resolution=8, batch_size=4).predict_dataloader()))
    assert set(plain) == {"image", "name"}
    with pytest.raises(ValueError, match=r"data\.masks=.*nowhere: no such folder"):
        FolderDataModule(tmp_path / "photos", resolution=8, masks=str(tmp_path / "nowhere"))


def test_folder_with_alignment_aligns_once_then_reads_the_aligned_copy(tmp_path, monkeypatch):
    from tests.test_face_alignment import fake_dlib, scene

    photos = tmp_path / "photos"
    photos.mkdir()
    faces = {}
    for k, (theta, shape) in enumerate([(0.0, (300, 300)), (0.3, (300, 320)), (-0.2, (320, 300))]):
        image, lm = scene(theta, 1.0, (shape[1] / 2, shape[0] / 2), shape)
        Image.fromarray(image).save(photos / f"{k}.png")
        faces[shape] = [((0, 0, 9, 9), lm)]
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(photos / "blank.png")
    model = tmp_path / "model.dat"
    model.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "dlib", fake_dlib(faces))
    dm = FolderDataModule(photos, resolution=16, align=True, align_size=32, predictor_path=str(model), batch_size=3)
    with pytest.warns(UserWarning, match=r"no face found in 1 image\(s\): blank\.png"):
        dm.prepare_data()
    assert sorted(p.name for p in (tmp_path / "photos_aligned32").iterdir()) == ["0.png", "1.png", "2.png",
                                                                              "alignment.json"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 3, 16, 16)
    assert [p.name for p in dm.train_set.dataset.files] == ["0.png", "1.png", "2.png"]


# --- SynthFaces evaluation data -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "sf"
    dm = SynthFacesDataModule(root, resolution=32, n_images=24, render_size=32, n_eval=6, batch_size=4)
    dm.prepare_data()
    return root


def synth_dm(root, **kwargs):
    opts = dict(resolution=32, n_images=24, render_size=32, n_eval=6, batch_size=4)
    opts.update(kwargs)
    return SynthFacesDataModule(root, **opts)


def test_synthfaces_test_batches_carry_masks_clean_twins_parts_and_labels(synth_root):
    dm = synth_dm(synth_root)
    batch = next(iter(dm.test_dataloader()))  # builds the test set on first use
    assert batch["image"].shape == batch["clean"].shape == (4, 3, 32, 32)
    assert batch["ood_mask"].shape == (4, 1, 32, 32) and batch["ood_mask"].dtype == torch.float32
    assert set(batch["ood_mask"].unique().tolist()) == {0.0, 1.0}
    assert batch["parts"].shape == (4, 32, 32) and batch["parts"].dtype == torch.int64
    assert batch["family"] == ["hand", "microphone", "text", "sticker"] and isinstance(batch["name"], list)
    assert batch["severity"].shape == (4,)
    # the mask is exactly where the corrupted twin differs from the clean one
    changed = ((batch["image"] - batch["clean"]).abs().amax(1, keepdim=True) > 0).float()
    assert torch.equal(changed, batch["ood_mask"])
    labels = json.loads((synth_root / "labels.json").read_text())
    assert set(batch["labels"]) == {f.name for f in FACTORS}
    assert batch["labels"]["hair_style"].dtype == torch.int64 and batch["labels"]["smile"].dtype == torch.float32
    assert batch["labels"]["hair_style"].tolist() == [labels[n]["hair_style"] for n in batch["name"]]
    clean_file = np.asarray(Image.open(synth_root / "images" / "00000" / f"{batch['name'][0]}.png"))
    torch.testing.assert_close(batch["clean"][0], torch.from_numpy(clean_file / 127.5 - 1).permute(2, 0, 1).float())
    predicted = next(iter(dm.predict_dataloader()))
    assert predicted["name"] == batch["name"] and torch.equal(predicted["image"], batch["image"])
    assert len(dm.test_set) == 6


def test_synthfaces_clean_test_variant_and_resized_masks_stay_binary(synth_root):
    clean = synth_dm(synth_root, test_variant="clean")
    batch = next(iter(clean.test_dataloader()))
    assert torch.equal(batch["image"], batch["clean"]) and batch["ood_mask"].sum() == 0
    assert batch["family"] == ["clean"] * 4 and batch["severity"].tolist() == [0.0] * 4
    small = SynthFacesEvalDataset(synth_root, resolution=16)[0]
    assert small["image"].shape == (3, 16, 16) and small["parts"].shape == (16, 16)
    assert set(small["ood_mask"].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match=r"data\.test_variant"):
        synth_dm(synth_root, test_variant="dirty")


def test_synthfaces_training_batches_are_named_image_dicts(synth_root):
    dm = synth_dm(synth_root)
    dm.setup("fit")
    assert len(dm.train_set) == 12 and len(dm.val_set) == 6
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "name"} and batch["image"].shape == (4, 3, 32, 32) and len(batch["name"]) == 4


# --- Hydra configs --------------------------------------------------------------------------------------

def build(compose_cfg, data, *overrides):
    cfg = compose_cfg(["+exp=stylegan", f"data={data}", "generator.size=8", "data.num_workers=0",
                       "data.batch_size=2", *overrides])
    return cfg, instantiate(cfg.data)


def test_every_data_config_builds_and_gives_training_batches(compose_cfg, tmp_path, make_images):
    ffhq_tree(tmp_path / "ffhq" / "images1024x1024", make_images, n=6)
    make_images(tmp_path / "celebahq" / "test", ["1.png", "2.png"], size=(16, 16))
    make_images(tmp_path / "celebahq" / "train", [f"{i}.png" for i in range(4)], size=(16, 16))
    make_images(tmp_path / "photos", ["x.jpg", "y.jpg"], size=(16, 16))
    cases = {
        "ffhq": [f"data.root={tmp_path / 'ffhq'}", "data.val_count=2", "data.expected_count=null"],
        "celebahq": [f"data.root={tmp_path / 'celebahq'}"],
        "folder": [f"data.root={tmp_path / 'photos'}"],
        "synthfaces": [f"data.root={tmp_path / 'sf'}", "data.n_images=24", "data.render_size=32", "data.n_eval=6"],
    }
    for name, overrides in cases.items():
        cfg, dm = build(compose_cfg, name, *overrides)
        assert dm.hparams.resolution == 8, name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dm.prepare_data()
            dm.setup("fit")
        assert next(iter(dm.train_dataloader()))["image"].shape == (2, 3, 8, 8), name
        assert isinstance(next(iter(dm.test_dataloader())), dict), name
        weights_only_roundtrip(dm.hparams)


def test_data_configs_document_every_key_and_need_root(compose_cfg):
    from omegaconf import OmegaConf

    from tests.conftest import CONFIG_DIR

    for name in ("ffhq", "celebahq", "folder", "synthfaces"):
        lines = (CONFIG_DIR / "data" / f"{name}.yaml").read_text().splitlines()
        settings = [line for line in lines if line and not line.startswith(("#", "_target_"))]
        undocumented = [line for line in settings if "#" not in line]
        assert undocumented == [], (name, undocumented)
        if name != "synthfaces":
            assert OmegaConf.is_missing(compose_cfg(["+exp=stylegan", f"data={name}"]).data, "root")
