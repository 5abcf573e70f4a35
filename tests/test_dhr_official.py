"""DHR hybrid modulation refinement against the official code (caopulan/GANInverter ``DHRInference``).

``tests/data/compat/dhr_ganinverter_64px.pt`` holds what the official refinement and one edit produced in float64 on
a tiny 64 px generator with the official defaults (50 weight steps at 1.5e-3, 100 feature steps at 9e-2, L2 and
LPIPS weights 1), f* at 16 px (``feature_idx`` 5), the shared random LPIPS backbone and a fixed mask (README in that
folder says how it was made). With its default ``RefineConfig`` ours must give the same output, f*, tuned weights
and edit to float64 round-off.
"""
import warnings

import pytest
import torch

from networks.refine.hybrid import RefineConfig, decode, hybrid_refine
from networks.stylegan2 import Generator
from tests.helpers.compat_weights import load_vectors, state_dict_from_vectors

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = dict(atol=1e-12, rtol=1e-10)   # float64; measured max |diff| at 1 / 2 threads: f* 7e-15 / 1.1e-14,
#                                      output 3.1e-15 / 3.6e-15, edit 4.9e-15 / 5.8e-15, weights 8.9e-16


@pytest.fixture(scope="module")
def vectors():
    return load_vectors("dhr_ganinverter_64px.pt")


@pytest.fixture(scope="module")
def G(vectors):
    c = vectors["config"]
    g = Generator(c["size"], style_dim=c["style_dim"], n_mlp=c["n_mlp"], channel_max=c["channels"])
    g.load_state_dict(state_dict_from_vectors(vectors))
    return g.double()


@pytest.fixture(scope="module")
def lpips(vectors):
    from lightning_modules.perceptual import LPIPSLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = LPIPSLoss(net="alex", allow_random_backbone=True)
    sums = {f"features.{n.split('.', 2)[1]}.{n.split('.', 2)[2]}": p.double().sum().item()
            for n, p in net.net.net.named_parameters()}
    assert sums == vectors["lpips_backbone_sums"], "LPIPSLoss's random backbone is not the one the vectors used"
    return net.double()


@pytest.fixture(scope="module")
def refined(vectors, G, lpips):
    c = vectors["config"]
    cfg = RefineConfig(feature_resolution=c["feature_resolution"])
    assert (cfg.weight_steps, cfg.weight_lr, cfg.feature_steps, cfg.feature_lr, cfg.l2, cfg.perceptual) == \
        (c["weight_steps"], c["weight_lr"], c["feature_steps"], c["feature_lr"], c["l2"], c["lpips"])
    return hybrid_refine(G, vectors["codes"], vectors["image"], vectors["in_domain"].double(), lpips, cfg)


def test_same_output_feature_and_weights_as_the_official_code(vectors, G, refined):
    assert refined.point == G.next_block_input(16) == "convs.4.in"     # official feature_idx 5
    assert refined.failed.tolist() == [False]
    torch.testing.assert_close(refined.mask_r, vectors["mask_r"], atol=0, rtol=0)
    torch.testing.assert_close(refined.feature, vectors["feature"], **TOL)
    assert set(refined.params) == set(vectors["weights"])
    for name, official in vectors["weights"].items():
        torch.testing.assert_close(refined.params[name][0], official, **TOL, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(decode(G, refined, vectors["codes"]), vectors["output"], **TOL)


def test_same_edit_as_the_official_code(vectors, G, refined):
    edit_codes = vectors["codes"] + vectors["config"]["edit_strength"] * vectors["direction"][:, None]
    torch.testing.assert_close(edit_codes, vectors["edit_codes"], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(decode(G, refined, edit_codes), vectors["edit_output"], **TOL)
