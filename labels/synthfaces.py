"""The SynthFaces label tables: the in-domain factors (every factor is a label) and the part classes.

One place that both the renderer (``datamodules.synthfaces``) and the networks trained on its labels
(``networks.synthfaces_nets``, ``networks.face_parsers``) read, so that ``networks/`` imports nothing of
``datamodules/``. Plain Python, no torch. New factors must be appended to ``FACTORS`` (never inserted) to keep
old seeds' images (``datamodules.synthfaces.factors.sample_factors`` maps column k to factor k).

Part classes: a pixel gets the class of the last-painted shape whose centre-sampled coverage is >= 0.5 (see
``datamodules.synthfaces.parts``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

@dataclass(frozen=True)
class Factor:
    """One label: ``kind`` is "float" (uniform in [low, high] unless ``probs`` says otherwise) or
    "int" (a category in {0, ..., len(probs) - 1}, drawn with probabilities ``probs``)."""

    name: str
    kind: str
    low: float
    high: float
    description: str
    probs: Optional[Sequence[float]] = None
    categories: Optional[Sequence[str]] = None


HAIR_STYLES = ("bald", "short", "bob", "long", "afro", "bun")
HAIR_COLORS = ("black", "dark_brown", "brown", "auburn", "blonde", "grey", "white")
EYE_COLORS = ("brown", "dark", "blue", "green", "grey")
GLASSES = ("none", "round", "rectangular", "sunglasses")
FRAME_COLORS = ("black", "brown", "gold", "red")


def _cat(name: str, cats: Sequence[str], probs: Sequence[float], desc: str) -> Factor:
    return Factor(name, "int", 0, len(cats) - 1, desc, probs=tuple(probs), categories=tuple(cats))


FACTORS: tuple[Factor, ...] = (
    Factor("face_width", "float", 0.86, 1.12, "head width multiplier (face shape)"),
    Factor("face_length", "float", 0.90, 1.10, "head height multiplier (face shape)"),
    Factor("jaw", "float", 0.0, 1.0, "chin taper: 0 round jaw, 1 pointed chin (face shape)"),
    Factor("pos_x", "float", -1.0, 1.0, "horizontal head offset, -1..1 = -0.08..0.08 image half-widths"),
    Factor("pos_y", "float", -1.0, 1.0, "vertical head offset, -1..1 = -0.06..0.06 image half-heights"),
    Factor("scale", "float", 0.9, 1.1, "head size multiplier"),
    Factor("yaw", "float", -1.0, 1.0, "yaw-like shift: inner features move sideways, far eye narrows"),
    Factor("roll", "float", -12.0, 12.0, "in-plane head rotation in degrees"),
    Factor("skin_tone", "float", 0.0, 1.0, "position on a light-to-dark skin colour ramp"),
    _cat("hair_style", HAIR_STYLES, (0.07, 0.30, 0.20, 0.25, 0.10, 0.08), "hair style"),
    _cat("hair_color", HAIR_COLORS, (0.22, 0.20, 0.18, 0.10, 0.16, 0.08, 0.06), "hair colour"),
    Factor("hairline", "float", 0.0, 1.0, "hairline height: 0 high forehead, 1 low fringe"),
    Factor("hair_part", "float", -1.0, 1.0, "slant of the hairline (side parting)"),
    Factor("eye_size", "float", 0.8, 1.25, "eye size multiplier"),
    _cat("eye_color", EYE_COLORS, (0.35, 0.20, 0.20, 0.12, 0.13), "iris colour"),
    Factor("eye_spacing", "float", 0.9, 1.1, "distance between the eyes, multiplier"),
    Factor("gaze", "float", -1.0, 1.0, "horizontal iris offset inside the eye"),
    Factor("brow_thickness", "float", 0.0, 1.0, "eyebrow thickness"),
    Factor("brow_raise", "float", 0.0, 1.0, "eyebrow height above the eye"),
    Factor("brow_tilt", "float", -1.0, 1.0, "eyebrow slant: >0 inner ends lower (frown), <0 raised"),
    Factor("smile", "float", 0.0, 1.0, "mouth-corner lift: <0.35 slightly down-turned, 1 broad smile"),
    Factor("mouth_open", "float", 0.0, 1.0, "lip opening: 0 closed (half of all faces), up to 1 wide open"),
    Factor("mouth_width", "float", 0.85, 1.15, "mouth width multiplier"),
    Factor("lip_red", "float", 0.0, 1.0, "lip colour: 0 skin-like, 1 red"),
    _cat("glasses", GLASSES, (0.60, 0.13, 0.14, 0.13), "glasses type"),
    _cat("frame_color", FRAME_COLORS, (0.4, 0.25, 0.2, 0.15), "glasses frame colour (drawn only with glasses)"),
    Factor("bg_hue", "float", 0.0, 1.0, "background hue of the first gradient colour"),
    Factor("bg_hue_shift", "float", -0.25, 0.25, "hue difference of the second gradient colour"),
    Factor("bg_saturation", "float", 0.05, 0.55, "background saturation"),
    Factor("bg_value", "float", 0.35, 0.95, "background brightness"),
    Factor("bg_angle", "float", 0.0, 2.0 * math.pi, "gradient direction in radians"),
    Factor("shirt_hue", "float", 0.0, 1.0, "clothing hue"),
    Factor("light_azimuth", "float", -1.0, 1.0, "horizontal light direction: -1 from the left, 1 from the right"),
    Factor("light_strength", "float", 0.0, 1.0, "directional shading strength"),
    Factor("light_warmth", "float", -1.0, 1.0, "colour temperature: -1 cool (blue), 1 warm (orange)"),
    Factor("exposure", "float", 0.85, 1.1, "global brightness multiplier"),
)
FACTOR_NAMES: tuple[str, ...] = tuple(f.name for f in FACTORS)


# ------------------------------------------------------------------------------------------ part classes
PART_CLASSES: tuple[str, ...] = (
    "background",  # 0
    "skin",        # 1 face skin
    "hair",        # 2
    "eye",         # 3 eye white, iris, pupil
    "brow",        # 4
    "nose",        # 5
    "lips",        # 6
    "mouth",       # 7 mouth interior and teeth
    "glasses",     # 8 frames, and lenses of sunglasses
    "ear",         # 9
    "neck",        # 10
    "clothes",     # 11
)
PART_INDEX = {name: i for i, name in enumerate(PART_CLASSES)}
NUM_PARTS = len(PART_CLASSES)

PART_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (204, 160, 120), (90, 50, 20), (255, 255, 255), (140, 30, 140), (255, 160, 0),
    (230, 30, 60), (120, 0, 0), (0, 200, 255), (60, 180, 60), (150, 110, 80), (40, 60, 200),
)
