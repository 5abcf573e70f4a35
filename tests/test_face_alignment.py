"""FFHQ face alignment: the crop-square maths and the warp on synthetic landmarks/images, dlib wiring with a
fake dlib module, and the messages when the optional extra is missing. No landmark model is needed."""
import sys
import types

import numpy as np
import pytest
from PIL import Image

from datamodules import face_alignment as fa
from datamodules.face_alignment import (
    AlignmentUnavailableError,
    FaceAligner,
    NoFaceFoundError,
    align_face,
    align_folder,
    ffhq_quad,
)

EYE_DIST, MOUTH_DROP = 40.0, 36.0  # canonical face: eyes at (+-20, 0), mouth corners at (+-15, 36)


def canonical_landmarks(d=EYE_DIST, m=MOUTH_DROP):
    """68 landmarks of an upright face: only the eyes (36-47) and mouth corners (48, 54) matter to FFHQ."""
    lm = np.zeros((68, 2))
    ring = np.array([[-4, 0], [-2, -2], [2, -2], [4, 0], [2, 2], [-2, 2]], float)  # mean (0, 0)
    lm[36:42] = ring + [-d / 2, 0]
    lm[42:48] = ring + [d / 2, 0]
    lm[48:60] = [0, m]
    lm[48], lm[54] = [-15, m], [15, m]
    lm[:17] = np.stack([np.linspace(-60, 60, 17), np.full(17, 50.0)], 1)  # a chin that FFHQ ignores
    return lm


def rotation(theta):
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def pattern(q):
    """Smooth colour field on the face's own (canonical) plane."""
    x, y = q[..., 0], q[..., 1]
    return np.stack([128 + 90 * np.sin(x / 9.0), 128 + 90 * np.cos(y / 11.0), 128 + 60 * np.sin((x + y) / 14.0)], -1)


def scene(theta, scale, centre, shape):
    """An image whose pixels are `pattern` of the face plane seen through a similarity transform, and the
    landmarks moved by the same transform."""
    R, t = rotation(theta), np.asarray(centre, float)
    landmarks = canonical_landmarks() @ R.T * scale + t
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    q = (np.stack([xx, yy], -1) - t) @ R / scale
    return np.clip(np.rint(pattern(q)), 0, 255).astype(np.uint8), landmarks


def expected_aligned(size):
    """What FFHQ alignment must give for `scene`: the face plane over the square of half side
    max(2 * eye distance, 1.8 * eye-to-mouth) = 80 centred at 0.1 of the way to the mouth."""
    half = max(2 * EYE_DIST, 1.8 * MOUTH_DROP)
    u = (np.arange(size) + 0.5) / size * 2 * half - half
    q = np.stack(np.meshgrid(u, u, indexing="xy"), -1) + [0.0, 0.1 * MOUTH_DROP]
    return pattern(q)


@pytest.mark.parametrize("theta", [0.0, 0.35, -1.2])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_quad_is_the_ffhq_square_rotating_and_scaling_with_the_face(theta, scale):
    R, t = rotation(theta), np.array([210.0, 190.0])
    quad, side = ffhq_quad(canonical_landmarks() @ R.T * scale + t)
    half = 80.0  # 2 * 40 > 1.8 * 36
    c = np.array([0.0, 0.1 * MOUTH_DROP])
    corners = np.array([c + [-half, -half], c + [-half, half], c + [half, half], c + [half, -half]])
    np.testing.assert_allclose(quad, corners @ R.T * scale + t, atol=1e-9)
    assert side == pytest.approx(2 * half * scale)


def test_quad_size_follows_the_larger_of_eye_distance_and_eye_to_mouth():
    lm = canonical_landmarks()
    lm[48:60, 1] = 100.0  # long face: 1.8 * 100 > 2 * 40
    _, side = ffhq_quad(lm)
    assert side == pytest.approx(2 * 1.8 * 100.0)


def test_quad_tilts_with_the_face_axis_not_only_the_eye_line():
    lm = canonical_landmarks()
    lm[48:60, 0] += 36.0  # mouth shifted right: face axis tilted by 45 degrees, eye line level
    quad, _ = ffhq_quad(lm)
    top = quad[3] - quad[0]
    # x = eye_to_eye - turn(eye_to_mouth) = (40, 0) - (-36, 36) = (76, -36): half way between both axes
    np.testing.assert_allclose(top / np.linalg.norm(top), np.array([76.0, -36.0]) / np.hypot(76, 36), atol=1e-9)


def test_quad_rejects_wrong_shapes_and_degenerate_faces():
    with pytest.raises(ValueError, match=r"68 landmarks"):
        ffhq_quad(np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"degenerate"):
        ffhq_quad(np.zeros((68, 2)))


@pytest.mark.parametrize(
    "theta,scale,centre,shape",
    [
        (0.0, 1.0, (150, 140), (300, 300)),   # upright, no resampling scale change
        (0.4, 1.7, (230, 200), (420, 460)),   # rotated and larger: warp at native size, area resize
        (-0.3, 6.0, (1000, 1000), (2000, 2000)),  # much larger: integer pre-shrink path
    ],
)
def test_aligned_image_is_the_face_plane_whatever_the_pose(theta, scale, centre, shape):
    image, landmarks = scene(theta, scale, centre, shape)
    out = align_face(image, landmarks, output_size=64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    err = np.abs(out.astype(float) - expected_aligned(64))
    assert err.mean() < 1.0 and err.max() < 6.0


def test_eyes_land_where_ffhq_puts_them():
    image = np.zeros((300, 300, 3), np.uint8)
    R, t = rotation(0.5), np.array([150.0, 150.0])
    landmarks = canonical_landmarks() @ R.T * 1.5 + t
    for eye, colour in ((landmarks[36:42].mean(0), (255, 0, 0)), (landmarks[42:48].mean(0), (0, 255, 0))):
        x, y = np.rint(eye).astype(int)
        image[y - 3 : y + 4, x - 3 : x + 4] = colour
    out = align_face(image, landmarks, output_size=160).astype(float)
    # 160 px over a square of side 160 face units centred at (0, 3.6): eye (-+20, 0) -> (80 -+ 20, 80 - 3.6)
    ys, xs = np.mgrid[:160, :160] + 0.5  # pixel centres
    for channel, expected_x in ((0, 60.0), (1, 100.0)):
        weights = out[..., channel] * (out[..., 1 - channel] < 50)
        cx, cy = (weights * xs).sum() / weights.sum(), (weights * ys).sum() / weights.sum()
        assert cx == pytest.approx(expected_x, abs=0.6) and cy == pytest.approx(76.4, abs=0.6)


def test_face_at_the_border_is_padded_not_black_and_padding_can_be_switched_off():
    image, landmarks = scene(0.2, 1.0, (60, 60), (200, 200))  # the square sticks out top-left
    padded = align_face(image, landmarks, output_size=64)
    plain = align_face(image, landmarks, output_size=64, enable_padding=False)
    assert padded[:4, :4].mean() > 40  # blurred reflection / median colour, not black
    assert (plain[:2, :2] == 0).all()  # FFHQ without padding leaves black outside the image
    inside = np.abs(padded[24:48, 24:48].astype(float) - expected_aligned(64)[24:48, 24:48])
    assert inside.max() < 6.0


def test_align_face_checks_the_image():
    with pytest.raises(ValueError, match=r"uint8"):
        align_face(np.zeros((10, 10), np.uint8), canonical_landmarks())


# --- dlib wiring with a fake dlib module -------------------------------------------------------------

class _Rect:
    def __init__(self, left, top, right, bottom):
        self._box = (left, top, right, bottom)

    def left(self):
        return self._box[0]

    def top(self):
        return self._box[1]

    def right(self):
        return self._box[2]

    def bottom(self):
        return self._box[3]


def fake_dlib(faces_by_shape, calls=None):
    """A dlib stand-in: the detector returns the faces registered for the image's shape
    ({(h, w): [(rect tuple, landmarks), ...]}); the predictor returns that face's landmarks."""
    module = types.ModuleType("dlib")

    def detector(image, upsample):
        if calls is not None:
            calls.append(image.shape)
        return [_Rect(*box) for box, _ in faces_by_shape.get(image.shape[:2], [])]

    def predictor(image, rect):
        for box, lm in faces_by_shape[image.shape[:2]]:
            if box == rect._box:
                points = [types.SimpleNamespace(x=float(x), y=float(y)) for x, y in lm]
                return types.SimpleNamespace(parts=lambda points=points: points)
        raise AssertionError("unknown rectangle")

    module.get_frontal_face_detector = lambda: detector
    module.shape_predictor = lambda path: predictor
    return module


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "shape_predictor_68_face_landmarks.dat"
    path.write_bytes(b"not read by the fake dlib")
    return path


def test_aligner_picks_the_largest_face_and_names_images_without_one(monkeypatch, model_file):
    image, landmarks = scene(0.3, 1.2, (150, 150), (300, 300))
    decoy = canonical_landmarks() * 0.3 + 40
    monkeypatch.setitem(sys.modules, "dlib", fake_dlib({(300, 300): [((30, 30, 60, 60), decoy),
                                                                     ((60, 60, 240, 240), landmarks)]}))
    aligner = FaceAligner(predictor_path=model_file)
    np.testing.assert_allclose(aligner.landmarks(image), landmarks)
    np.testing.assert_array_equal(aligner(image, output_size=32), align_face(image, landmarks, 32))
    with pytest.raises(NoFaceFoundError, match=r"No face found in holiday\.jpg"):
        aligner.landmarks(np.zeros((10, 10, 3), np.uint8), name="holiday.jpg")


def test_align_folder_writes_aligned_pngs_lists_faceless_photos_once_and_resumes(monkeypatch, tmp_path, model_file):
    src = tmp_path / "photos"
    shots = {"a.jpg": scene(0.0, 1.0, (150, 150), (300, 300)), "sub/b.png": scene(0.5, 1.4, (160, 170), (320, 340))}
    faces = {}
    for name, (image, lm) in shots.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(src / name, quality=98)
        faces[image.shape[:2]] = [((0, 0, 10, 10), lm)]
    Image.fromarray(np.full((50, 60, 3), 90, np.uint8)).save(src / "wall.png")  # no face
    calls = []
    monkeypatch.setitem(sys.modules, "dlib", fake_dlib(faces, calls))
    aligner = FaceAligner(predictor_path=model_file)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    out = tmp_path / "aligned"
    with pytest.warns(UserWarning, match=r"no face found in 1 image\(s\): wall\.png") as record:
        aligned = align_folder(files, src, out, 32, aligner, log=lambda s: None)
    assert len([w for w in record if "no face" in str(w.message)]) == 1
    assert [p.relative_to(out).as_posix() for p in aligned] == ["a.png", "sub/b.png"]
    expected = align_face(np.asarray(Image.open(src / "sub/b.png")), shots["sub/b.png"][1], 32)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "sub/b.png")), expected)
    assert '"wall.png"' in (out / "alignment.json").read_text()
    calls.clear()
    with pytest.warns(UserWarning, match=r"wall\.png"):
        assert align_folder(files, src, out, 32, aligner, log=lambda s: None) == aligned
    assert calls == []  # nothing re-detected: finished and faceless photos are remembered
    with pytest.raises(ValueError, match=r"aligned at 32 px, not 64"):
        align_folder(files, src, out, 64, aligner, log=lambda s: None)


def test_no_face_anywhere_is_one_clear_error(monkeypatch, tmp_path, model_file):
    (tmp_path / "p").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "p" / "x.png")
    monkeypatch.setitem(sys.modules, "dlib", fake_dlib({}))
    no_face = r"No face found in any of the 1 images.*data\.align"
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=no_face):
        align_folder([tmp_path / "p" / "x.png"], tmp_path / "p", tmp_path / "out", 16, FaceAligner(model_file),
                     log=lambda s: None)


# --- the optional extra is missing ---------------------------------------------------------------------

def test_missing_dlib_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # makes `import dlib` fail like an absent package
    with pytest.raises(AlignmentUnavailableError, match=r'needs dlib.*pip install "invertlab\[align\]"'):
        FaceAligner()
    assert issubclass(AlignmentUnavailableError, ImportError)


def test_missing_landmark_model_package_or_file_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "dlib", fake_dlib({}))
    monkeypatch.setitem(sys.modules, "face_recognition_models", None)
    hint = r"face-recognition-models is not installed.*invertlab\[align\].*data\.predictor_path"
    with pytest.raises(AlignmentUnavailableError, match=hint):
        FaceAligner()
    with pytest.raises(FileNotFoundError, match=r"nope\.dat does not exist \(data\.predictor_path\)"):
        FaceAligner(predictor_path=tmp_path / "nope.dat")
    package = tmp_path / "site" / "face_recognition_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "face_recognition_models")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(AlignmentUnavailableError, match=r"has no models/shape_predictor_68_face_landmarks\.dat"):
        FaceAligner()
    (package / "models").mkdir()
    (package / "models" / fa.LANDMARK_MODEL).write_bytes(b"x")
    assert fa.default_predictor_path() == package / "models" / fa.LANDMARK_MODEL
    FaceAligner()  # found without importing the package (which would need pkg_resources)


def test_folder_datamodule_asking_for_alignment_without_the_extra_fails_at_construction(monkeypatch, tmp_path):
    from datamodules.folder import FolderDataModule

    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photos" / "a.png")
    monkeypatch.setitem(sys.modules, "dlib", None)
    with pytest.raises(AlignmentUnavailableError, match=r"data\.align=true.*needs dlib.*invertlab\[align\]"):
        FolderDataModule(tmp_path / "photos", resolution=8, align=True)
    FolderDataModule(tmp_path / "photos", resolution=8)  # no alignment asked: dlib is not needed
