"""The generator reproduces rosinality's outputs on the shipped compatibility vectors."""
import pytest
import torch

from networks.stylegan2 import Generator
from tests.helpers.compat_weights import load_vectors, state_dict_from_vectors

VECTORS = load_vectors("stylegan2_rosinality_32px.pt")


def _close(out, ref):
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.fixture(scope="module", params=["ref", "fast"])
def generator(request):
    g = Generator(**VECTORS["config"], impl=request.param).eval()
    g.load_state_dict(state_dict_from_vectors(VECTORS), strict=True)
    return g


def _case(name):
    return next(c for c in VECTORS["cases"] if c["name"].startswith(name))


def test_spec_matches_parameter_names_and_shapes():
    g = Generator(**VECTORS["config"])
    ours = {k: list(v.shape) for k, v in g.state_dict().items()}
    theirs = {k: list(s) for k, s in VECTORS["spec"]}
    assert ours == theirs


@torch.no_grad()
def test_mapping(generator):
    case = _case("mapping")
    out = generator.get_latent(case["z"])
    torch.testing.assert_close(out, case["w"], rtol=1e-4, atol=1e-7)


@torch.no_grad()
def test_z_to_image_with_stored_noise(generator):
    case = _case("z_to_image")
    image, _ = generator([case["z"]])  # default: deterministic stored noise buffers
    _close(image, case["image"])


@torch.no_grad()
def test_wplus_to_image(generator):
    case = _case("wplus_to_image")
    image, latent = generator([case["wplus"]], input_is_latent=True, return_latents=True)
    _close(image, case["image"])
    assert torch.equal(latent, case["wplus"])


@torch.no_grad()
def test_truncation_towards_case_mean(generator):
    case = _case("truncation")
    mean_w = generator.get_latent(case["z"]).mean(0, keepdim=True)
    image, _ = generator([case["z"]], truncation=case["truncation"], truncation_latent=mean_w)
    _close(image, case["image"])
