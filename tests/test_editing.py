"""Latent editing (networks.editing) and its CLIs (experiments/fit_direction.py, compute_ganspace.py)."""
import json

import numpy as np
import pytest
import torch

from networks.checkpoints import CheckpointError, export_generator
from networks.editing import (apply_ganspace, apply_interfacegan, compute_ganspace_pca,
                              fit_interfacegan_direction, load_direction, load_ganspace, save_direction)
from networks.stylegan2 import Generator
from networks.synthfaces_nets import AttributeClassifier, save_aux_net

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_generator(seed=0):
    torch.manual_seed(seed)
    return Generator(size=16, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=32).eval()


# ------------------------------------------------------------------------------------------- directions
@pytest.mark.parametrize("fmt", ["pt_1d", "pt_2d", "npy_1d", "npy_2d", "pth"])
def test_load_direction_formats(tmp_path, fmt):
    d = torch.randn(1, 12)
    if fmt.startswith("pt") or fmt == "pth":
        path = tmp_path / ("dir.pth" if fmt == "pth" else "dir.pt")
        torch.save(d[0] if fmt == "pt_1d" else d, path)
    else:
        path = tmp_path / "dir.npy"
        np.save(path, d.numpy()[0] if fmt == "npy_1d" else d.numpy().astype(np.float64))
    out = load_direction(path, dim=12)
    assert out.shape == (1, 12) and out.dtype == torch.float32
    torch.testing.assert_close(out, d)


def test_load_direction_errors(tmp_path):
    torch.save(torch.randn(2, 12), tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match=r"two\.pt.*\(1, D\).*\(2, 12\)"):
        load_direction(tmp_path / "two.pt")
    np.save(tmp_path / "int.npy", np.zeros((1, 12), np.int64))
    with pytest.raises(CheckpointError, match=r"int\.npy.*float direction"):
        load_direction(tmp_path / "int.npy")
    torch.save({"direction": torch.randn(1, 12)}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match=r"dict\.pt holds a dict"):
        load_direction(tmp_path / "dict.pt")
    (tmp_path / "dir.txt").write_text("1 2 3")
    with pytest.raises(CheckpointError, match=r"dir\.txt: unsupported direction format '\.txt'"):
        load_direction(tmp_path / "dir.txt")
    with pytest.raises(CheckpointError, match=r"missing\.npy"):
        load_direction(tmp_path / "missing.npy")
    with pytest.raises(CheckpointError, match=r"missing\.pt"):
        load_direction(tmp_path / "missing.pt")
    torch.save(torch.randn(1, 12), tmp_path / "ok.pt")
    with pytest.raises(CheckpointError, match=r"ok\.pt: direction has D=12 but the generator's style_dim is 16"):
        load_direction(tmp_path / "ok.pt", dim=16)


def test_save_direction_roundtrip(tmp_path):
    d = torch.randn(7)
    path = save_direction(tmp_path / "sub" / "d.pt", d)
    raw = torch.load(path, weights_only=True)
    assert raw.shape == (1, 7) and raw.dtype == torch.float32
    torch.testing.assert_close(load_direction(path), d.view(1, 7))


def test_apply_interfacegan_arithmetic():
    codes = torch.randn(3, 6, 4)
    d = torch.randn(1, 4)
    out = apply_interfacegan(codes, d, 2.0)
    torch.testing.assert_close(out, codes + 2.0 * d)
    # per-image strength
    s = torch.tensor([1.0, -1.0, 0.5])
    torch.testing.assert_close(apply_interfacegan(codes, d, s), codes + s.view(3, 1, 1) * d)
    # layer ranges: slice, (start, end), list; untouched rows stay equal
    for layers, rows in ((slice(1, 3), [1, 2]), ((2, 5), [2, 3, 4]), ([0, 5], [0, 5]), (range(4, 6), [4, 5])):
        out = apply_interfacegan(codes, d, 3.0, layers=layers)
        expected = codes.clone()
        expected[:, rows] += 3.0 * d
        torch.testing.assert_close(out, expected)
    # one direction per row
    per_row = torch.randn(6, 4)
    torch.testing.assert_close(apply_interfacegan(codes, per_row, -1.0), codes - per_row)
    with pytest.raises(ValueError, match=r"direction must be \(1, 4\) or \(6, 4\)"):
        apply_interfacegan(codes, torch.randn(2, 4), 1.0)
    with pytest.raises(ValueError, match=r"strength must be a float or a tensor of shape \(3,\)"):
        apply_interfacegan(codes, d, torch.ones(2))
    with pytest.raises(ValueError, match="out of range"):
        apply_interfacegan(codes, d, 1.0, layers=[6])


# -------------------------------------------------------------------------------------------- GANSpace
def reference_ganspace_edit(latent, pca, idx, start, end, strength):
    """The e4e / HFGI get_delta formula for one (L, D) code, written out with the official layout."""
    centered = latent - pca["mean"]
    comp, std = pca["comp"], pca["std"]
    coord = torch.sum(centered[0].reshape(-1) * comp[idx].reshape(-1)) / std[idx]
    delta = (strength - coord) * comp[idx] * std[idx]
    padded = torch.zeros(latent.shape)
    padded[start:end] += delta.repeat(end - start, 1)
    return latent + padded


def test_ganspace_edit_matches_formula(tmp_path):
    K, D = 5, 8
    comp = torch.linalg.qr(torch.randn(D, K))[0].T  # orthonormal rows
    pca_file = {"mean": torch.randn(1, D), "comp": comp.unsqueeze(1), "std": torch.rand(K) + 0.5}
    torch.save(pca_file, tmp_path / "pca.pt")
    pca = load_ganspace(tmp_path / "pca.pt")
    assert pca.comp.shape == (K, D) and pca.mean.shape == (1, D) and pca.std.shape == (K,)
    codes = torch.randn(3, 6, D)
    out = apply_ganspace(codes, pca, 2, 1, 4, 7.0)
    for b in range(3):
        torch.testing.assert_close(out[b], reference_ganspace_edit(codes[b], pca_file, 2, 1, 4, 7.0))
    # after the edit, row 1's coordinate along the component is exactly the strength (row 0 was the anchor)
    coord = ((out[:, 1] - codes[:, 1] + codes[:, 0] - pca.mean) @ pca.comp[2]) / pca.std[2]
    torch.testing.assert_close(coord, torch.full((3,), 7.0))
    # per-image strengths
    s = torch.tensor([1.0, -2.0, 0.0])
    out = apply_ganspace(codes, pca, 0, 0, 6, s)
    for b in range(3):
        torch.testing.assert_close(out[b], reference_ganspace_edit(codes[b], pca_file, 0, 0, 6, float(s[b])))
    with pytest.raises(ValueError, match="component index 5 out of range"):
        apply_ganspace(codes, pca, 5, 0, 1, 1.0)


def test_load_ganspace_errors(tmp_path):
    torch.save({"mean": torch.zeros(1, 4), "comp": torch.zeros(3, 4)}, tmp_path / "nostd.pt")
    with pytest.raises(CheckpointError, match=r"nostd\.pt: a GANSpace file needs keys 'mean', 'comp', 'std'"):
        load_ganspace(tmp_path / "nostd.pt")
    torch.save({"mean": torch.zeros(1, 5), "comp": torch.zeros(3, 4), "std": torch.ones(3)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: inconsistent GANSpace shapes"):
        load_ganspace(tmp_path / "bad.pt")
    np.savez(tmp_path / "gs.npz", lat_mean=np.zeros((1, 4), np.float32), lat_comp=np.eye(4, dtype=np.float32)[:2, None],
             lat_stdev=np.ones(2, np.float32))
    pca = load_ganspace(tmp_path / "gs.npz")
    assert pca.comp.shape == (2, 4)


def test_compute_ganspace_pca_properties(tmp_path):
    G = tiny_generator()
    pca = compute_ganspace_pca(G, n_samples=2000, n_components=10, seed=0)
    assert pca.comp.shape == (10, 32) and pca.mean.shape == (1, 32) and pca.std.shape == (10,)
    torch.testing.assert_close(pca.comp @ pca.comp.T, torch.eye(10), atol=1e-5, rtol=0)
    assert (pca.std[:-1] >= pca.std[1:]).all() and (pca.std > 0).all()
    assert (pca.var_ratio[:-1] >= pca.var_ratio[1:]).all() and 0 < pca.var_ratio.sum() <= 1 + 1e-6
    # the std is the spread of the samples' coordinates along each component
    with torch.no_grad():
        w = G.get_latent(torch.randn(2000, 32, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(((w - pca.mean) @ pca.comp.T).std(0), pca.std, rtol=1e-3, atol=1e-5)
    # deterministic, and save/load keeps the official layout
    again = compute_ganspace_pca(G, n_samples=2000, n_components=10, seed=0)
    torch.testing.assert_close(again.comp, pca.comp)
    raw = torch.load(pca.save(tmp_path / "pca.pt"), weights_only=True)
    assert raw["comp"].shape == (10, 1, 32) and raw["mean"].shape == (1, 32) and raw["std"].shape == (10,)
    loaded = load_ganspace(tmp_path / "pca.pt")
    torch.testing.assert_close(loaded.comp, pca.comp)
    torch.testing.assert_close(loaded.var_ratio, pca.var_ratio)
    with pytest.raises(ValueError, match="n_components"):
        compute_ganspace_pca(G, n_samples=100, n_components=40)


# ----------------------------------------------------------------------------------------- fitting
@pytest.mark.parametrize("method", ["linear_svm", "logistic"])
def test_fit_recovers_planted_direction(method):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(800, 16, generator=gen) * 2 + 1
    planted = torch.randn(1, 16, generator=gen)
    planted = planted / planted.norm()
    scores = (latents @ planted.T).squeeze(1) + 0.1 * torch.randn(800, generator=gen)
    d = fit_interfacegan_direction(latents, scores, method=method, quantile=0.3)
    assert d.shape == (1, 16)
    torch.testing.assert_close(d.norm(), torch.tensor(1.0))
    assert (d @ planted.T).item() > 0.9
    # the positive side follows the scores: negated scores flip the direction
    assert (fit_interfacegan_direction(latents, -scores, method=method) @ planted.T).item() < -0.9


def test_fit_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        fit_interfacegan_direction(torch.randn(20, 3), torch.randn(20), method="svr")
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 0.5\]"):
        fit_interfacegan_direction(torch.randn(20, 3), torch.randn(20), quantile=0.7)
    with pytest.raises(ValueError, match=r"latents \(N, D\) and scores \(N,\)"):
        fit_interfacegan_direction(torch.randn(20, 3), torch.randn(19))


# --------------------------------------------------------------------------------------------- CLIs
@pytest.fixture
def tiny_files(tmp_path):
    G = tiny_generator()
    gen_path = export_generator(tmp_path / "gen" / "generator.pt", G, G.mean_latent(256, seed=0)[0])
    torch.manual_seed(1)
    clf = AttributeClassifier(resolution=16, widths=(4, 8), feature_dim=8, attributes=["smile", "glasses"]).eval()
    clf_path = save_aux_net(tmp_path / "clf.pt", clf)
    return G, gen_path, clf_path


def test_fit_direction_cli(tiny_files, tmp_path, capsys):
    from experiments import fit_direction

    G, gen_path, clf_path = tiny_files
    report = fit_direction.main([str(gen_path), "--attribute", "smile", "--classifier", str(clf_path),
                                 "--n", "200", "--eval-samples", "8", "--batch", "50"])
    out = gen_path.parent / "directions" / "smile.pt"  # default location
    d = load_direction(out, dim=G.style_dim)
    torch.testing.assert_close(d.norm(), torch.tensor(1.0))
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["n"] == 200 and saved["eval_samples"] == 8
    for key in ("before", "plus_change", "minus_change", "plus_success", "projection_score_corr"):
        assert saved[key] == pytest.approx(report[key])
    assert report["projection_score_corr"] > 0  # the direction points towards higher scores
    assert f"-> {out}" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        fit_direction.main([str(gen_path), "--attribute", "glasses", "--classifier", str(clf_path),
                            "--out", str(tmp_path / "g.pt")])
    err = capsys.readouterr().err
    assert "'glasses' is not a continuous label" in err and "smile" in err


def test_compute_ganspace_cli(tiny_files, tmp_path, capsys):
    from experiments import compute_ganspace

    G, gen_path, _ = tiny_files
    out = compute_ganspace.main([str(gen_path), "--n", "500", "--components", "6", "--out", str(tmp_path / "p.pt")])
    raw = torch.load(out, weights_only=True)
    assert set(raw) >= {"mean", "comp", "std"} and raw["comp"].shape == (6, 1, 32)
    assert "6 components" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["fit_direction", "compute_ganspace"])
def test_cli_help(script, capsys):
    import importlib

    module = importlib.import_module(f"experiments.{script}")
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out
