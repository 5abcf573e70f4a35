"""Per-image drawing parameters of SynthFaces, derived once per batch from the factor labels.

``face_params`` maps the factor dict to a flat dict of (N, 1, 1) scalars and (N, 3, 1, 1) colours
in the renderer's units (the head frame: the head's half-width is ``rx`` ~ 0.5, y points down,
eyes at v = EYE_V, mouth at v ~ MOUTH_V). Precomputing them for the whole batch keeps the
per-chunk drawing code down to large whole-image tensor ops.
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from .sdf import hsv_to_rgb, palette_lookup

Tensor = torch.Tensor

EYE_V = -0.09
MOUTH_V = 0.36
SMILE_NEUTRAL = 0.35  # smile value at which the mouth line is straight

SKIN_RAMP = torch.tensor([[0.98, 0.86, 0.76], [0.94, 0.76, 0.62], [0.82, 0.60, 0.44],
                          [0.62, 0.42, 0.28], [0.40, 0.26, 0.17]])
HAIR_RGB = torch.tensor([[0.07, 0.06, 0.06], [0.22, 0.14, 0.09], [0.42, 0.28, 0.16],
                         [0.58, 0.24, 0.10], [0.88, 0.72, 0.42], [0.60, 0.60, 0.60],
                         [0.90, 0.89, 0.86]])
IRIS_RGB = torch.tensor([[0.40, 0.24, 0.10], [0.16, 0.10, 0.07], [0.30, 0.52, 0.80],
                         [0.30, 0.58, 0.32], [0.52, 0.58, 0.64]])
FRAME_RGB = torch.tensor([[0.06, 0.06, 0.07], [0.38, 0.22, 0.10], [0.85, 0.68, 0.25],
                          [0.75, 0.10, 0.12]])
LIP_RED = torch.tensor([0.72, 0.22, 0.25])

# Hair-style tables, indexed by hair_style (bald, short, bob, long, afro, bun).
HAIR_TABLES = {
    "front_on": [0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    "cap_t": [0.0, 0.05, 0.07, 0.07, 0.17, 0.05],         # hair thickness over the skull
    "side_len": [-9.0, -0.05, 0.26, 0.50, 0.12, -0.06],   # how far side hair reaches down
    "side_w": [0.0, 0.06, 0.13, 0.12, 0.14, 0.06],        # width of side hair over the face
    "bun_r": [-1.0, -1.0, -1.0, -1.0, -1.0, 0.16],
    "back_on": [0.0, 0.0, 1.0, 1.0, 1.0, 0.0],
    "back_add": [0.0, 0.0, 0.09, 0.10, 0.27, 0.0],        # back hair margin around the head
    "back_cy": [0.0, 0.0, 0.0, 0.0, -0.10, 0.0],
    "box_bottom": [0.0, 0.0, 0.30, 1.10, 0.0, 0.0],      # hanging part of bob / long; 0: none
    "bumps": [0.0, 0.0, 0.0, 0.0, 0.035, 0.0],
    "ears_on": [1.0, 1.0, 0.0, 0.0, 0.0, 1.0],
}
# Glasses tables, indexed by glasses (none, round, rectangular, sunglasses).
GLASSES_TABLES = {
    "lens_round": [0.0, 1.0, 0.0, 0.0],
    "lens_hx": [0.13, 0.125, 0.13, 0.135],
    "lens_hy": [0.085, 0.125, 0.085, 0.095],
    "lens_r": [0.03, 0.125, 0.03, 0.05],
    "lens_opacity": [0.0, 0.14, 0.14, 0.88],
}
LENS_RGB = torch.tensor([[0.0, 0.0, 0.0], [0.75, 0.85, 0.95], [0.75, 0.85, 0.95], [0.04, 0.04, 0.07]])


def _layer_boxes(P: Dict[str, Tensor]) -> Tensor:
    """Per-image local boxes (u0, u1, v0, v1), (N, 3, 4), bounding the head, the front hair and
    the back hair (with 0.02 to spare for the approximate ellipse distance)."""
    rx, ry = P["rx"], P["ry"]
    head = torch.stack([-rx, rx, -ry, ry], 1)
    mrx, mry = P["mass_rx"], P["mass_ry"]
    reach = P["hairline"] + P["part_slope"].abs() * mrx + 0.7 * mrx * mrx  # lowest hairline point
    v1 = torch.minimum(torch.maximum(reach, P["side_len"]), mry)
    front = torch.stack([-mrx, mrx, torch.minimum(-mry, P["bun_v"] - P["bun_r"]), v1], 1)
    front = torch.where(P["front_on"][:, None] > 0, front, head)
    bu, bv = P["back_rx"] + P["bumps"], P["back_ry"] + P["bumps"]
    back = torch.stack([-bu, bu, P["back_cy"] - bv, torch.maximum(P["back_cy"] + bv, P["box_bottom"])], 1)
    back = torch.where(P["back_on"][:, None] > 0, back, head)
    return torch.stack([head, front, back], 1) + torch.tensor([-0.02, 0.02, -0.02, 0.02])


def face_params(f: Dict[str, Tensor], device: torch.device) -> Dict[str, Tensor]:
    """Derive drawing parameters from factors ``f`` (name -> (N,) tensor).

    Returns name -> (N, 1, 1) float32 scalar or (N, 3, 1, 1) colour (names ending in ``_rgb``),
    on ``device``. Everything here is per-image arithmetic; no pixel is touched.
    """
    fl = {k: v.detach().to("cpu", torch.float32) for k, v in f.items()}
    n = fl["smile"].shape[0]
    style, glasses = f["hair_style"].long().cpu(), f["glasses"].long().cpu()
    P: Dict[str, Tensor] = {}
    # Head frame.
    P["s"] = 1.1 * fl["scale"]
    roll = fl["roll"] * (math.pi / 180.0)
    P["cr"], P["sr"] = torch.cos(roll) / P["s"], torch.sin(roll) / P["s"]
    P["cos"], P["sin"] = torch.cos(roll), torch.sin(roll)
    P["cx"], P["cy"] = 0.08 * fl["pos_x"], 0.06 * fl["pos_y"]
    rx, ry = 0.5 * fl["face_width"], 0.62 * fl["face_length"]
    P["rx"], P["ry"], P["inv_ry"] = rx, ry, 1.0 / ry
    P["yaw"], P["fx"] = fl["yaw"], 0.06 * fl["yaw"]
    P["jaw"] = 0.28 * fl["jaw"]
    P["neck_hw"] = 0.2 * fl["face_width"]
    P["clothes_v"], P["neckline_v"] = ry + 0.64, ry + 0.2
    P["ear_shift"], P["ear_u"] = 0.04 * fl["yaw"], 0.97 * rx
    for k, vals in HAIR_TABLES.items():
        P[k] = torch.tensor(vals)[style]
    P["back_rx"], P["back_ry"] = rx + P["back_add"], ry + P["back_add"]
    P["box_hw"], P["box_hh"] = rx + P["back_add"] + 0.01, 0.5 * P["box_bottom"]
    P["mass_rx"], P["mass_ry"] = rx + P["cap_t"], ry + P["cap_t"]
    P["side_in"] = rx - P["side_w"]
    P["hairline"] = -0.46 + 0.18 * fl["hairline"]
    P["part_slope"] = 0.12 * fl["hair_part"]
    P["strand_c"] = ry + 0.45
    P["bun_v"] = -(ry + 0.07)
    # Eyes and brows.
    P["eye_es"] = 0.2 * fl["eye_spacing"]
    P["eye_squash"] = 0.18 * fl["yaw"]
    esz = fl["eye_size"]
    P["eye_rx"], P["eye_ry"] = 0.085 * esz, 0.042 * esz
    P["iris_r"], P["pupil_r"], P["gaze"] = 0.037 * esz, 0.017 * esz, 0.022 * fl["gaze"]
    P["brow_v"] = 0.115 + 0.045 * fl["brow_raise"]
    P["brow_tilt"] = -0.035 * fl["brow_tilt"]
    P["brow_th"] = 0.012 + 0.014 * fl["brow_thickness"]
    # Mouth: a centre line that bends up at the corners with smile, an opening, lips.
    smile, mopen = fl["smile"], fl["mouth_open"]
    P["mouth_w"] = 0.15 * fl["mouth_width"] * (1.0 + 0.18 * smile)
    P["lift"] = 0.16 * (smile - SMILE_NEUTRAL)
    gap = 0.009 + 0.065 * mopen
    P["gap_top"], P["gap_bot"] = gap * (0.6 - 0.3 * smile), gap * (0.6 + 0.5 * smile)
    P["teeth_on"] = ((mopen - 0.1) * 5.0).clamp(0.0, 1.0)
    # Glasses.
    for k, vals in GLASSES_TABLES.items():
        P[k] = torch.tensor(vals)[glasses]
    P["glasses_on"] = (glasses > 0).float()
    P["lens_part"] = (P["lens_opacity"] > 0.5).float()
    P["temple_u"] = 0.97 * rx
    # Light: direction from the azimuth, normals of an ellipsoid slightly larger than the head.
    lx = 0.75 * fl["light_azimuth"]
    P["lx"], P["ly"] = lx, torch.full((n,), -0.35)
    P["lz"] = (1.0 - lx * lx - 0.35 ** 2).sqrt()
    P["n_iu"], P["n_iv"] = 1.0 / (1.2 * rx), 1.0 / (1.2 * ry)
    P["ambient"], P["diffuse"] = 1.0 - 0.6 * fl["light_strength"], 0.6 * fl["light_strength"]
    P["bg_gx"], P["bg_gy"] = 0.35 * torch.cos(fl["bg_angle"]), 0.35 * torch.sin(fl["bg_angle"])
    out = {k: v.reshape(n, 1, 1) for k, v in P.items()}
    out["boxes"] = _layer_boxes(P)

    # Colours.
    skin = palette_lookup(SKIN_RAMP, fl["skin_tone"])
    hair = HAIR_RGB[f["hair_color"].long().cpu()]
    red = (0.25 + 0.5 * fl["lip_red"])[:, None]
    sat, val = fl["bg_saturation"], fl["bg_value"]
    bg1 = hsv_to_rgb(fl["bg_hue"], sat, val)
    bg2 = hsv_to_rgb(fl["bg_hue"] + fl["bg_hue_shift"], sat, val * 0.75)
    warm = fl["light_warmth"][:, None]
    tint = torch.cat([1.0 + 0.07 * warm, torch.ones_like(warm), 1.0 - 0.07 * warm], dim=1)
    rgb = {
        "skin": skin, "neck": skin * 0.84, "ear": skin * 0.92, "nose": skin * 0.95,
        "nose_tip": skin * 0.78, "nostril": skin * 0.5, "lid": skin * 0.25,
        "hair": hair, "brow": hair * 0.7 + 0.03,
        "shirt": hsv_to_rgb(fl["shirt_hue"], torch.full((n,), 0.55), torch.full((n,), 0.62)),
        "eye_white": torch.tensor([0.95, 0.95, 0.93]).expand(n, 3),
        "iris": IRIS_RGB[f["eye_color"].long().cpu()],
        "pupil": IRIS_RGB[f["eye_color"].long().cpu()] * 0.15,
        "lips": skin * 0.78 * (1.0 - red) + LIP_RED * red,
        "mouth_in": torch.tensor([0.30, 0.06, 0.08]).expand(n, 3),
        "teeth": torch.tensor([0.94, 0.93, 0.88]).expand(n, 3),
        "lens": LENS_RGB[glasses], "frame": FRAME_RGB[f["frame_color"].long().cpu()],
        "bg": bg1, "bg_delta": bg2 - bg1,
        "out_scale": tint * (255.0 * fl["exposure"])[:, None],
    }
    out.update({k + "_rgb": v.reshape(n, 3, 1, 1) for k, v in rgb.items()})
    return {k: v.to(device=device, dtype=torch.float32).contiguous() for k, v in out.items()}
