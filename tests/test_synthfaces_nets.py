"""Auxiliary SynthFaces networks: classifier / parser shapes and label maths, training signal,
export and strict reload, the labelled DataModule, the Lightning modules via run.py, and FID."""
import json
import math

import pytest
import torch

from datamodules.synthfaces import FACTOR_NAMES, NUM_PARTS, render_batch, write_dataset
from datamodules.synthfaces.factors import FACTORS
from networks.checkpoints import CheckpointError
from networks.synthfaces_nets import (AttributeClassifier, FaceParser, SynthFacesFeatures, build_heads,
                                      load_attribute_classifier, load_face_parser, read_meta, save_aux_net,
                                      visibility_mask)

TINY_CLF = dict(resolution=32, widths=(4, 8), feature_dim=16)
TINY_PARSER = dict(resolution=32, widths=(4, 8, 8))


def label_vectors(labels: dict) -> torch.Tensor:
    return torch.stack([labels[n].float() for n in FACTOR_NAMES], 1)


@pytest.fixture(scope="module")
def faces():
    """16 rendered 32 px faces: float images in [-1, 1], label vectors (16, 36), part maps."""
    torch.manual_seed(0)
    out = render_batch(3, 16, size=32)
    return {"image": out["images"].float() / 127.5 - 1.0, "labels": label_vectors(out["labels"]),
            "parts": out["parts"], "uint8": out["images"]}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """A 40-image 32 px SynthFaces dataset on disk (train 0-31, val 32-35, test 36-39)."""
    root = tmp_path_factory.mktemp("sf") / "synthfaces"
    write_dataset(root, n=40, size=32, seed=2, n_eval=4, log=lambda m: None)
    return root


# ---------------------------------------------------------------------------------------------- networks
def test_heads_cover_every_label_with_the_right_kind():
    heads = build_heads()
    assert [h.name for h in heads] == list(FACTOR_NAMES)
    kinds = {h.name: (h.kind, h.width) for h in heads}
    assert kinds["glasses"] == ("categorical", 4) and kinds["hair_style"] == ("categorical", 6)
    assert kinds["smile"] == ("regression", 1) and kinds["bg_angle"] == ("circular", 2)
    assert [h.name for h in build_heads(["smile", "glasses"])] == ["smile", "glasses"]
    with pytest.raises(ValueError, match="distinct SynthFaces labels"):
        build_heads(["smile", "grin"])


def test_classifier_shapes_and_predictions(faces):
    net = AttributeClassifier(**TINY_CLF).eval()
    raw = net(faces["image"])
    assert raw.shape == (16, net.out_dim) and net.out_dim == sum(h.width for h in net.heads)
    assert net.features(faces["image"]).shape == (16, 16)
    pred = net.predict(faces["image"])
    assert list(pred) == list(FACTOR_NAMES)
    assert pred["glasses"].dtype == torch.int64 and pred["glasses"].shape == (16,)
    assert int(pred["hair_style"].max()) < 6 and pred["smile"].dtype == torch.float32
    assert bool(((pred["bg_angle"] >= 0) & (pred["bg_angle"] < 2 * math.pi)).all())
    # other input sizes are resized to the training resolution
    big = torch.nn.functional.interpolate(faces["image"], size=64, mode="bilinear", align_corners=False)
    assert net(big).shape == raw.shape
    assert net.probabilities(faces["image"][:2])["glasses"].sum(1).allclose(torch.ones(2))
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        net(torch.zeros(2, 1, 32, 32))


def test_targets_and_decode_are_inverse(faces):
    net = AttributeClassifier(**TINY_CLF)
    labels = faces["labels"]
    targets = net.targets(labels)
    raw = torch.cat([torch.nn.functional.one_hot(targets[h.name], h.width).float() * 10 if h.kind == "categorical"
                     else targets[h.name].reshape(len(labels), -1) for h in net.heads], 1)
    decoded = net.decode(raw)
    for h in net.heads:
        want = labels[:, h.column]
        got = decoded[h.name].float()
        if h.kind == "circular":  # equal modulo the period
            span = h.high - h.low
            got = torch.remainder(got - want + span / 2, span) - span / 2 + want
        assert torch.allclose(got, want, atol=1e-4), h.name
    assert targets["smile"].min() >= -1 and targets["smile"].max() <= 1


def test_hidden_labels_are_ignored_by_the_loss(faces):
    net = AttributeClassifier(**TINY_CLF)
    labels = faces["labels"].clone()
    g, fc = FACTOR_NAMES.index("glasses"), FACTOR_NAMES.index("frame_color")
    labels[:8, g] = 0  # no glasses: frame colour invisible
    labels[8:, g] = 1
    mask = visibility_mask(labels, net.heads)
    assert not mask[:8, net.head_index["frame_color"]].any() and mask[8:, net.head_index["frame_color"]].all()
    raw = net(faces["image"])
    _, before = net.loss(raw, labels)
    changed = labels.clone()
    changed[:8, fc] = (changed[:8, fc] + 1) % 4
    _, after = net.loss(raw, changed)
    assert torch.equal(before["frame_color"], after["frame_color"])
    with pytest.raises(ValueError, match="does not predict"):
        net.loss(raw, labels, {"grin": 2.0})


def test_classifier_loss_falls_on_a_tiny_batch(faces):
    torch.manual_seed(0)
    net = AttributeClassifier(**TINY_CLF)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss, _ = net.loss(net(faces["image"]), faces["labels"], {"smile": 2.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses[::8]


def test_parser_shapes_and_loss_falls(faces):
    torch.manual_seed(0)
    net = FaceParser(**TINY_PARSER)
    assert net(faces["image"]).shape == (16, NUM_PARTS, 32, 32)
    assert net(torch.zeros(1, 3, 48, 48)).shape == (1, NUM_PARTS, 48, 48)  # logits at the input size
    assert net.predict(faces["image"][:2]).dtype == torch.int64
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(net(faces["image"]), faces["parts"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses[::6]
    with pytest.raises(ValueError, match="FaceParser: need"):
        FaceParser(resolution=32, widths=(4,))


def _trained_a_little(net, images):
    net.train()
    with torch.no_grad():  # gives BatchNorm non-trivial running statistics
        net(images)
    return net.eval()


def test_export_and_strict_reload_give_identical_outputs(faces, tmp_path):
    torch.manual_seed(1)
    clf = _trained_a_little(AttributeClassifier(**TINY_CLF, attributes=["smile", "glasses", "bg_hue"]), faces["image"])
    parser = _trained_a_little(FaceParser(**TINY_PARSER), faces["image"])
    p_clf = save_aux_net(tmp_path / "attribute_classifier.pt", clf, {"note": "x"})
    p_par = save_aux_net(tmp_path / "face_parser.pt", parser)
    raw = torch.load(p_clf, weights_only=True)
    assert set(raw) == {"state_dict", "config", "meta"} and raw["meta"] == {"note": "x", "kind": "attribute_classifier"}
    assert raw["config"]["attributes"] == ["smile", "glasses", "bg_hue"]
    clf2, par2 = load_attribute_classifier(p_clf), load_face_parser(p_par)
    assert not clf2.training and not par2.training
    assert torch.equal(clf2(faces["image"]), clf(faces["image"]))
    assert torch.equal(par2(faces["image"]), parser(faces["image"]))
    assert read_meta(p_par)["kind"] == "face_parser"

    with pytest.raises(CheckpointError, match="holds a 'face_parser' network, expected 'attribute_classifier'"):
        load_attribute_classifier(p_par)
    raw["state_dict"].pop("head.bias")
    torch.save(raw, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"(?s)broken.pt does not fit.*missing \(1\): head.bias"):
        load_attribute_classifier(tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_face_parser(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------------------------- FID
def test_fid_is_zero_for_a_set_against_itself_and_grows_with_blur(faces):
    from lightning_modules.fid import fid_score, gaussian_blur

    torch.manual_seed(2)
    feats = SynthFacesFeatures(_trained_a_little(AttributeClassifier(**TINY_CLF), faces["image"]))
    images = torch.cat([faces["image"], faces["image"].flip(-1)])  # 32 images
    same = fid_score(images, images, feats)
    blurred = fid_score(images, gaussian_blur(images, 1.0), feats)
    assert abs(same) < 1e-3 * max(blurred, 1e-6) and blurred > 0
    assert fid_score(images, gaussian_blur(images, 2.0), feats) > blurred
    # uint8 input (torchmetrics' default contract) gives the same features as float [0, 1]
    u8 = faces["uint8"]
    assert torch.allclose(feats(u8), feats(u8.float() / 255), atol=1e-5)
    # data loaders of dict batches work like tensors
    loader = [{"image": images[:16]}, {"image": images[16:]}]
    assert fid_score(loader, gaussian_blur(images, 1.0), feats) == pytest.approx(blurred, rel=1e-4)
    # the metric switching to train mode must not switch BatchNorm to batch statistics
    feats.train()
    assert not feats.classifier.training
    with pytest.raises(ValueError, match=">= 2 images"):
        fid_score(images[:1], images, feats)


def test_gaussian_blur_keeps_constants_and_smooths():
    from lightning_modules.fid import gaussian_blur

    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat, atol=1e-6)
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur(noise, 1.0).std() < 0.6 * noise.std()
    assert gaussian_blur(noise, 1.0).shape == noise.shape


# ---------------------------------------------------------------------------------------------- data
def test_labelled_datamodule_batches_match_the_files(tiny_dataset):
    from datamodules.synthfaces_labelled import SynthFacesLabelledDataModule

    dm = SynthFacesLabelledDataModule(tiny_dataset, resolution=32, n_images=40, render_size=32, n_eval=4,
                                      batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["labels"].shape == (4, len(FACTOR_NAMES)) and batch["parts"].dtype == torch.int64
    assert batch["index"].tolist() == [32, 33, 34, 35] and batch["name"] == ["00032", "00033", "00034", "00035"]
    labels = json.loads((tiny_dataset / "labels.json").read_text())
    assert batch["labels"][1, FACTOR_NAMES.index("smile")].item() == pytest.approx(labels["00033"]["smile"])
    assert len(dm.dataset("train")) == 32 and dm.dataset("test").indices == [36, 37, 38, 39]
    assert len(next(iter(dm.train_dataloader()))["image"]) == 8
    # other resolutions: images resized, part maps by nearest neighbour
    dm16 = SynthFacesLabelledDataModule(tiny_dataset, resolution=16, n_images=40, render_size=32, n_eval=4,
                                        preload=False)
    item = dm16.dataset("val")[0]
    assert item["image"].shape == (3, 16, 16) and item["parts"].shape == (16, 16)
    assert dm16.dataset("test", "ood/images")[0]["image"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="holds 40 images, data.n_images says 50"):
        SynthFacesLabelledDataModule(tiny_dataset, n_images=50, render_size=32, n_eval=4).dataset("val")


def test_labelled_datamodule_names_a_broken_dataset(tmp_path):
    from datamodules.synthfaces_labelled import read_dataset_info

    (tmp_path / "ds").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a complete SynthFaces dataset.*labels.json"):
        read_dataset_info(tmp_path / "ds")


# ---------------------------------------------------------------------------------------------- run.py
@pytest.mark.parametrize("exp, handoff", [("synthfaces_classifier", "attribute_classifier.pt"),
                                          ("synthfaces_parser", "face_parser.pt")])
def test_exp_trains_validates_and_hands_off(exp, handoff, tiny_dataset, compose_cfg, tmp_path):
    from experiments.run import train

    width = "[4,8]" if exp == "synthfaces_classifier" else "[4,8,8]"
    cfg = compose_cfg([f"+exp={exp}", f"data.root={tiny_dataset}", "data.n_images=40", "data.render_size=32",
                       "data.n_eval=4", "data.render_seed=2", "data.batch_size=8", "generator.size=32", f"model.net.widths={width}",
                       "trainer=cpu", "trainer.max_epochs=1", "trainer.max_steps=4", "logger=csv",
                       "trainer.enable_progress_bar=false"])
    path = train(cfg)
    assert path == tmp_path / "run" / handoff and path.is_file()
    ckpt = torch.load(path, weights_only=True)
    meta = ckpt["meta"]
    assert meta["global_step"] == 4 and meta["data"]["resolution"] == 32
    if exp == "synthfaces_classifier":
        net = load_attribute_classifier(path)
        assert {"acc/glasses", "mae/smile", "corr/smile", "mean_acc"} <= set(meta["val_metrics"])
        assert [d["name"] for d in meta["labels"]] == list(FACTOR_NAMES)
        assert ckpt["config"]["resolution"] == 32
    else:
        net = load_face_parser(path)
        assert "miou" in meta["val_metrics"] and "iou/skin" in meta["val_metrics"]
        assert 0 <= meta["val_metrics"]["miou"] <= 1
        weights = dict(zip(meta["part_classes"], meta["class_weights"]))  # class_weight_power 0.5 in the config
        assert weights["background"] < weights["skin"] < weights["brow"] and abs(sum(weights.values()) / 12 - 1) < 1e-4
    assert net.resolution == 32
    metrics = (tmp_path / "run" / "csv").rglob("metrics.csv")
    assert any("val/loss" in p.read_text().splitlines()[0] for p in metrics)


def test_evaluation_cli_prints_tables(tiny_dataset, faces, tmp_path, capsys):
    from lightning_modules.synthfaces_aux import main

    torch.manual_seed(3)
    clf = save_aux_net(tmp_path / "c.pt", _trained_a_little(AttributeClassifier(**TINY_CLF), faces["image"]))
    par = save_aux_net(tmp_path / "p.pt", _trained_a_little(FaceParser(**TINY_PARSER), faces["image"]))
    out = main(["--classifier", str(clf), "--parser", str(par), "--data-root", str(tiny_dataset), "--split", "test",
                "--json", str(tmp_path / "m.json")])
    text = capsys.readouterr().out
    assert "| glasses |" in text and "| smile |" in text and "**mIoU**" in text
    assert set(out) == {"classifier", "parser"} and json.loads((tmp_path / "m.json").read_text())["parser"]["pixel_acc"] >= 0
    assert len([f for f in FACTORS if f.kind == "int"]) == len([k for k in out["classifier"] if k.startswith("acc/")])
