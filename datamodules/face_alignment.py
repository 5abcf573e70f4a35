"""FFHQ-style face alignment: dlib's 68 landmarks -> the FFHQ oriented crop square -> an aligned image.

Geometry (the FFHQ recipe, as in NVlabs' ffhq-dataset and the `align_face` of e4e / PTI; written here
from those facts): eye centres are the means of landmarks 36-41 and 42-47, the mouth centre the mean
of the corners 48 and 54. The crop is a square whose x axis is the eye-to-eye vector minus the
eye-to-mouth vector turned by 90 degrees (so both the eye line and the face's vertical axis orient
it), whose half side is max(2 * eye distance, 1.8 * eye-to-mouth distance) and whose centre lies
0.1 of the way from the eye midpoint to the mouth. The image is pre-shrunk by an integer factor
when the square is more than 4x the output size, cropped to the square plus a border, reflect-padded
where the square leaves the image (the padding is blurred and faded to the median colour, as FFHQ
does), then warped onto the output grid.

Resampling: FFHQ warps bilinearly to 4096 px and then downsizes with an antialiasing filter; here the
warp runs at the square's own pixel size (at least the output size) and an area resize brings it to
the output size, so the result is antialiased without a 4096 px intermediate. The geometry (where
each landmark lands) is the same.

dlib is an optional extra: `pip install "invertlab[align]"` (dlib-bin and face-recognition-models,
which ships the 68-point landmark model), or give any `shape_predictor_68_face_landmarks.dat` with
`predictor_path`. Without it, `FaceAligner` raises `AlignmentUnavailableError` saying what to install.
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from datamodules.image_folder import DataError, describe_files, read_rgb

ALIGN_EXTRA_HINT = 'pip install "invertlab[align]"   (that is: pip install dlib-bin face-recognition-models)'
LANDMARK_MODEL = "shape_predictor_68_face_landmarks.dat"
MANIFEST = "alignment.json"


class AlignmentUnavailableError(ImportError):
    """dlib or the 68-point landmark model is missing; the message says what to install or configure."""


class NoFaceFoundError(DataError):
    """The face detector found no face in an image (the message names it)."""


def ffhq_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """FFHQ crop square from 68 dlib landmarks (x, y) in pixel coordinates.

    Returns ``(quad, side)``: quad (4, 2) float64, the corners top-left, bottom-left, bottom-right,
    top-right of the output image in input coordinates; side, the square's side length in pixels.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 2 or lm.shape[0] != 68 or lm.shape[1] < 2:
        raise ValueError(f"expected 68 landmarks of shape (68, 2), got {lm.shape}")
    lm = lm[:, :2]
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_mid = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (lm[48] + lm[54]) / 2 - eye_mid

    def turn(v):  # rotate by 90 degrees: (vx, vy) -> (-vy, vx)
        return np.array([-v[1], v[0]])

    x = eye_to_eye - turn(eye_to_mouth)
    norm = np.hypot(*x)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("degenerate landmarks: the eyes and mouth do not span a face")
    half = max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    x = x / norm * half
    y = turn(x)
    c = eye_mid + 0.1 * eye_to_mouth
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad, 2.0 * half


def align_face(
    image: np.ndarray,
    landmarks: np.ndarray,
    output_size: int = 1024,
    transform_size: int | None = None,
    enable_padding: bool = True,
) -> np.ndarray:
    """Crops and rotates `image` (H, W, 3) uint8 RGB to the FFHQ square of `landmarks` (68, 2).

    output_size: side of the result; transform_size: side of the warp before the final area resize
    (default: the square's own size in pixels, at least `output_size`); enable_padding: fill the
    parts of the square outside the image with blurred reflections (else black).
    Returns (output_size, output_size, 3) uint8.
    """
    img = np.ascontiguousarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    quad, qsize = ffhq_quad(landmarks)
    h, w = img.shape[:2]

    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rw, rh = max(1, int(np.rint(w / shrink))), max(1, int(np.rint(h / shrink)))
        img = cv2.resize(img, (rw, rh), interpolation=cv2.INTER_AREA)
        quad = (quad + 0.5) * [rw / w, rh / h] - 0.5  # pixel centres map to pixel centres
        qsize = qsize * rw / w
        h, w = rh, rw

    border = max(int(np.rint(qsize * 0.1)), 3)
    lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
    x0, y0 = max(lo[0] - border, 0), max(lo[1] - border, 0)
    x1, y1 = min(hi[0] + border, w), min(hi[1] + border, h)
    if x1 - x0 < w or y1 - y0 < h:
        img = img[y0:y1, x0:x1]
        quad = quad - [x0, y0]
        h, w = img.shape[:2]

    border_mode = cv2.BORDER_CONSTANT
    if enable_padding:
        lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
        pad = np.array([max(-lo[0] + border, 0), max(-lo[1] + border, 0),
                        max(hi[0] - w + border, 0), max(hi[1] - h + border, 0)])
        if pad.max() > border - 4:
            pad = np.maximum(pad, max(int(np.rint(qsize * 0.3)), 1))
            img = _pad_blurred(img, pad, qsize)
            quad = quad + pad[:2]
        border_mode = cv2.BORDER_REFLECT

    size = int(transform_size or max(output_size, int(np.ceil(qsize))))
    # Affine map from output pixel (u, v) to input pixel coordinates; the quad's edges span the
    # output's [0, size] box, pixel centres at +0.5.
    ex, ey = (quad[3] - quad[0]) / size, (quad[1] - quad[0]) / size
    origin = quad[0] + 0.5 * ex + 0.5 * ey
    matrix = np.array([[ex[0], ey[0], origin[0]], [ex[1], ey[1], origin[1]]], dtype=np.float64)
    out = cv2.warpAffine(img, matrix, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=border_mode, borderValue=0)
    if size != output_size:
        interp = cv2.INTER_AREA if size > output_size else cv2.INTER_CUBIC
        out = cv2.resize(out, (output_size, output_size), interpolation=interp)
    return out


def _pad_blurred(img: np.ndarray, pad: np.ndarray, qsize: float) -> np.ndarray:
    """Reflect-pads `img` by pad = (left, top, right, bottom); the padding is blurred and faded towards
    the median colour with the distance from the image (FFHQ's padding)."""
    left, top, right, bottom = (int(p) for p in pad)
    out = np.pad(img.astype(np.float32), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    hh, ww = out.shape[:2]
    yy, xx = np.ogrid[:hh, :ww]
    xx, yy = xx.astype(np.float32), yy.astype(np.float32)
    mask = np.maximum(1.0 - np.minimum(xx / left, (ww - 1 - xx) / right),
                      1.0 - np.minimum(yy / top, (hh - 1 - yy) / bottom))[..., None]
    sigma = qsize * 0.02
    blurred = cv2.GaussianBlur(out, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    out += (blurred - out) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    out += (np.median(out, axis=(0, 1)) - out) * np.clip(mask, 0.0, 1.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def import_dlib():
    """Returns the dlib module or raises `AlignmentUnavailableError` with the install command."""
    try:
        import dlib
    except ImportError as exc:
        raise AlignmentUnavailableError(
            f"Face alignment (data.align=true) needs dlib, which cannot be imported ({exc}). "
            f"Install the optional extra: {ALIGN_EXTRA_HINT}"
        ) from exc
    return dlib


def default_predictor_path() -> Path:
    """Path of the 68-point landmark model shipped by face-recognition-models (found without importing it,
    which would need pkg_resources); raises `AlignmentUnavailableError` if the package or file is missing."""
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AlignmentUnavailableError(
            f"Face alignment needs dlib's 68-point landmark model: face-recognition-models is not installed. "
            f"Install the optional extra: {ALIGN_EXTRA_HINT}, or set data.predictor_path=/path/to/{LANDMARK_MODEL}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "models" / LANDMARK_MODEL
        if path.is_file():
            return path
    raise AlignmentUnavailableError(
        f"face-recognition-models is installed but has no models/{LANDMARK_MODEL}; reinstall it "
        f"({ALIGN_EXTRA_HINT}) or set data.predictor_path=/path/to/{LANDMARK_MODEL}"
    )


def resolve_predictor_path(predictor_path: str | Path | None) -> Path:
    """`predictor_path` if given (must exist), else `default_predictor_path()`."""
    if predictor_path is None:
        return default_predictor_path()
    path = Path(predictor_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Landmark model {path} does not exist (data.predictor_path); leave it null to use "
                                f"the one from face-recognition-models ({ALIGN_EXTRA_HINT}).")
    return path


class FaceAligner:
    """dlib's HOG frontal face detector + 68-point shape predictor + `align_face`.

    predictor_path: landmark model file (default: face-recognition-models' copy); upsample: how many
    times the detector upsamples the image (finds smaller faces, slower). The largest detected face is
    aligned. Raises `AlignmentUnavailableError` if dlib or the model is missing.
    """

    def __init__(self, predictor_path: str | Path | None = None, upsample: int = 1):
        dlib = import_dlib()
        path = resolve_predictor_path(predictor_path)
        self.upsample = int(upsample)
        self.detector = dlib.get_frontal_face_detector()
        try:
            self.predictor = dlib.shape_predictor(str(path))
        except RuntimeError as exc:  # dlib's error for an unreadable or wrong model file
            raise AlignmentUnavailableError(f"dlib cannot load the landmark model {path} ({exc}); it must be "
                                            f"{LANDMARK_MODEL} (data.predictor_path)") from exc

    def landmarks(self, image: np.ndarray, name: str = "the image") -> np.ndarray:
        """68 landmarks (68, 2) float64 of the largest face in `image` (H, W, 3) uint8 RGB; raises
        `NoFaceFoundError` naming `name` when there is none."""
        faces = list(self.detector(image, self.upsample))
        if not faces:
            raise NoFaceFoundError(f"No face found in {name}.")
        face = max(faces, key=lambda r: (r.right() - r.left()) * (r.bottom() - r.top()))
        shape = self.predictor(image, face)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    def __call__(self, image: np.ndarray, output_size: int = 1024, name: str = "the image") -> np.ndarray:
        """The aligned face of `image`: (output_size, output_size, 3) uint8."""
        return align_face(image, self.landmarks(image, name), output_size)


def align_folder(
    files: Sequence[Path],
    root: Path,
    out: Path,
    output_size: int,
    aligner: Callable[..., np.ndarray],
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Aligns every image of `files` (under `root`) into `out`, as `<relative path without extension>.png`.

    aligner: `FaceAligner` (or any callable ``(image, output_size, name) -> aligned``). Resumable:
    existing outputs are kept, and images listed in `out/alignment.json` as faceless or unreadable are
    not retried. Images without a face or that cannot be decoded are skipped with one warning listing
    them. Returns the aligned files (in the order of `files`); raises DataError if none.
    """
    root, out = Path(root), Path(out)
    manifest_path = out / MANIFEST
    manifest = {"output_size": output_size, "no_face": [], "unreadable": []}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("output_size") != output_size:
            raise DataError(f"{out} holds faces aligned at {old.get('output_size')} px, not {output_size}: "
                            f"set data.aligned_root to another folder or data.align_size={old.get('output_size')}")
        manifest.update(old)
    skipped = set(manifest["no_face"]) | set(manifest["unreadable"])
    targets: dict[Path, Path] = {}
    for src in files:
        rel = Path(src).relative_to(root).with_suffix(".png")
        if rel in targets:
            raise DataError(f"{targets[rel]} and {src} would both be aligned to {out / rel}; rename one of them")
        targets[rel] = Path(src)
    aligned, done = [], 0
    for rel, src in targets.items():
        key = rel.as_posix()
        dst = out / rel
        if key in skipped:
            continue
        if not dst.is_file():
            try:
                result = aligner(read_rgb(src), output_size=output_size, name=str(src))
            except NoFaceFoundError:
                manifest["no_face"].append(key)
                continue
            except DataError:
                manifest["unreadable"].append(key)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".tmp")
            Image.fromarray(result).save(tmp, format="PNG")
            os.replace(tmp, dst)
            done += 1
            if done % 100 == 0:
                log(f"[align] {done} faces aligned into {out}")
        aligned.append(dst)
    current = {rel.as_posix() for rel in targets}
    for kind in ("no_face", "unreadable"):
        manifest[kind] = [k for k in manifest[kind] if k in current]
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    notes = []
    if manifest["no_face"]:
        notes.append(f"no face found in {len(manifest['no_face'])} image(s): {describe_files(manifest['no_face'])}")
    if manifest["unreadable"]:
        notes.append(f"{len(manifest['unreadable'])} unreadable image(s): {describe_files(manifest['unreadable'])}")
    if notes:
        warnings.warn(f"Face alignment of {root} skipped images ({'; '.join(notes)}); the list is kept in "
                      f"{manifest_path}", stacklevel=2)
    if not aligned:
        raise DataError(f"No face found in any of the {len(targets)} images under {root} (data.root); "
                        f"face alignment needs frontal faces (or set data.align=false)")
    log(f"[align] {len(aligned)} aligned faces in {out} ({done} new)")
    return aligned
