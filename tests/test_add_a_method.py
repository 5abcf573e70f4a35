"""The README's "Add a method" example: a new stage-3 method is one class (a ``networks.refine.methods.Method``
subclass) plus one config file that names it in ``model.method``; the module, metrics, edits and writer take it as
they take the built-in methods."""
import torch

from lightning_modules.contracts import DrawsEditGrids, KeepsTestTable, SummarisesTests, WritesInversions
from networks.refine.hybrid import decode
from networks.refine.methods import HybridRefinement
from tests.test_stage3 import batch, files, make_module, make_tester  # noqa: F401 (files: the fixture)

METHOD = "tests.test_add_a_method.PixelErrorDHR"


class PixelErrorDHR(HybridRefinement):
    """DHR whose domain is where the encoder's reconstruction G(codes) is close to the input (no coarse inversion):
    weights there, the feature f* elsewhere."""

    name = "pixel_error_dhr"
    threshold = 0.5

    def in_domain(self, images, codes, taps):
        with torch.no_grad():
            error = (self.generator.synthesize(codes).image - images).abs().mean(1, keepdim=True)  # (B, 1, S, S)
        in_domain = (error < self.threshold).float()
        return in_domain, 1 - in_domain, {}


def test_a_new_method_is_one_class_named_in_the_config(files, tmp_path, compose_cfg):  # noqa: F811
    assert compose_cfg(["+exp=dhr", f"model.method={METHOD}"]).model.method == METHOD  # the config file's one line
    module = make_module(files, METHOD)
    assert isinstance(module.refiner, PixelErrorDHR)
    assert all(isinstance(module, c) for c in (DrawsEditGrids, KeepsTestTable, SummarisesTests, WritesInversions))
    x = torch.stack([b["image"] for b in batch()])
    result = module.invert(x)
    with torch.no_grad():
        expected = ((module.generator.synthesize(result["codes"]).image - x).abs().mean(1, keepdim=True) >= 0.5)
    assert torch.equal(result["ood_mask"], expected.float())
    torch.testing.assert_close(module.render_edit(result, x, result["codes"] + 0.5),
                               decode(module.generator, result["state"], result["codes"] + 0.5))

    make_tester(tmp_path).test(module, torch.utils.data.DataLoader(batch(), batch_size=2), verbose=False)
    row = module.test_table.rows[0]
    assert row["failed"] == 0.0 and {"psnr", "iou@0.5", "edit_success"} <= set(row)
    assert "pixel_error_dhr (stage 3)" in module.edit_grid(x, result)["smile"]["rows"]
