"""Stage 3 in plain PyTorch: per-image refinement methods and what they are made of.

- ``methods``: one class per method (E4E, OODBlend, DHR, PTI, FeatureOnly) with ``invert`` and ``render``;
- ``hybrid``: the hybrid modulation (per-image weights + feature f*), decode, per-image state files;
- ``segmenter``: ``DomainSegmenter`` (coarse inversion, error maps, superpixels, parsing, stage-2 mask);
- ``segmentation``: the DSS maths (SLIC regions, per-layer region scores, per-class thresholds, mask sources);
- ``projection``: optimisation-based embedding (PTI's projector, batched), the coarse inversion of the DSS.
"""
