"""SynthFaces: a procedural, seeded, vectorised face renderer with labels, part maps and OOD
corruptions with exact masks; the project's default domain (see docs/design.md).

Public API:
    render_batch(seed_or_generator, n, size=64) -> {"images", "parts", "labels"}
    sample_factors / render_factors: the two halves of render_batch
    corrupt_batch(images, parts, family, severity, generator) -> (images, ood_mask)
    write_dataset(out, n, size, seed, n_eval, ...): FFHQ-like folder (CLI: python -m datamodules.synthfaces)
    FACTORS, PART_CLASSES, OOD_FAMILIES: label, part-class and corruption-family lists
"""
from .corrupt import OOD_FAMILIES, corrupt_batch
from .factors import FACTOR_NAMES, FACTORS, sample_factors
from .parts import NUM_PARTS, PART_CLASSES, colorize_parts
from .render import SIZES, render_batch, render_factors
from .writer import write_dataset

__all__ = ["OOD_FAMILIES", "corrupt_batch", "FACTOR_NAMES", "FACTORS", "sample_factors", "NUM_PARTS",
           "PART_CLASSES", "colorize_parts", "SIZES", "render_batch", "render_factors", "write_dataset"]
