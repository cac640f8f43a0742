"""Mask methods one by one: alpha, face, color, import, full, and the registry."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdprep.dataset import Item
from sdprep.errors import ConfigError, ImageError, ModelError
from sdprep.images import load_image
from sdprep.prep.masks import MASK_METHODS, MaskMethod, MaskNotFound, MethodSettings, create_method, register
from sdprep.prep.masks import face as face_module
from sdprep.prep.masks.color import background, border_color, parse_color

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_data" / "images"
ASTRONAUT = Path(__file__).resolve().parent / "assets" / "astronaut_256.jpg"


def make(name, path, **settings):
    method = create_method(name, MethodSettings(**settings))
    method.load()
    image = load_image(path, mode=method.image_mode)
    return method.make(image, Item(Path(path)))


# -- registry --------------------------------------------------------------------------------


def test_registry_has_every_method_and_rejects_duplicates():
    from sdprep.prep.cli.mask import METHODS

    assert set(MASK_METHODS) == {"alpha", "face", "clipseg", "color", "import", "full"} == set(METHODS)

    class Other(MaskMethod):
        name = "alpha"

    with pytest.raises(ValueError, match='"alpha" is already registered'):
        register(Other)
    with pytest.raises(ConfigError) as err:
        create_method("alpah")
    assert str(err.value) == (
        'unknown mask method "alpah"\n'
        'Hint: did you mean "alpha"? valid: alpha, clipseg, color, face, full, import'
    )


# -- alpha / full ----------------------------------------------------------------------------


def test_alpha_is_the_transparency():
    path = SAMPLES / "f_transparent.png"
    mask = make("alpha", path)
    alpha = np.asarray(Image.open(path).getchannel("A"), dtype=np.float32) / 255.0
    assert mask.dtype == np.float32 and mask.shape == (512, 512)
    assert np.array_equal(mask, alpha)
    assert mask[0, 0] == 0.0 and mask[300, 256] == 1.0


def test_alpha_without_transparency_is_a_per_file_miss():
    with pytest.raises(MaskNotFound) as err:
        make("alpha", SAMPLES / "a_landscape.jpg")
    assert err.value.reason == "no transparency (no alpha channel, or every pixel is opaque)"
    assert "--fallback full" in err.value.hint


def test_full_is_all_white_at_the_image_size():
    mask = make("full", SAMPLES / "h_wide.jpg")
    assert mask.shape == (400, 900) and mask.min() == 1.0


# -- face ------------------------------------------------------------------------------------


def test_face_finds_the_astronaut():
    mask = make("face", ASTRONAUT, pad=0.0)
    assert mask.shape == (256, 256)
    ys, xs = np.nonzero(mask)
    # the face is about x 86-140, y 30-84 in this 256 px picture (measured once by eye)
    assert 70 <= xs.min() <= 100 and 125 <= xs.max() <= 155
    assert 15 <= ys.min() <= 45 and 70 <= ys.max() <= 100
    assert mask[57, 113] == 1.0 and mask[200, 30] == 0.0 and mask[5, 5] == 0.0


def test_face_padding_grows_the_box():
    plain = make("face", ASTRONAUT, pad=0.0)
    padded = make("face", ASTRONAUT, pad=0.5)
    ys, xs = np.nonzero(plain)
    pys, pxs = np.nonzero(padded)
    w = xs.max() - xs.min() + 1
    assert pxs.max() - pxs.min() + 1 == pytest.approx(2 * w, abs=2)
    assert padded.sum() > 3.5 * plain.sum()


def test_face_on_a_faceless_image_is_a_miss():
    with pytest.raises(MaskNotFound) as err:
        make("face", SAMPLES / "h_wide.jpg")
    assert err.value.reason == "no face found (cascade haarcascade_frontalface_default.xml)"


def test_face_cascade_files(tmp_path, monkeypatch):
    assert face_module.resolve_cascade(None).name == "haarcascade_frontalface_default.xml"
    assert face_module.resolve_cascade("haarcascade_frontalface_alt2.xml").is_file()
    with pytest.raises(ModelError, match="cascade file not found: nope.xml"):
        face_module.resolve_cascade("nope.xml")
    bad = tmp_path / "bad.xml"
    bad.write_text("<opencv_storage></opencv_storage>")
    with pytest.raises(ModelError, match="not a cascade OpenCV can load"):
        create_method("face", MethodSettings(cascade=str(bad))).load()
    # an OpenCV without cascade files (5.x wheels): a clear error naming the way out
    monkeypatch.setattr(face_module, "opencv_cascade_dir", lambda: tmp_path)
    with pytest.raises(ModelError) as err:
        face_module.resolve_cascade(None)
    assert "OpenCV 5 wheels ship no cascade files" in str(err.value)
    assert "--cascade FILE" in err.value.hint


def test_face_bad_pad():
    with pytest.raises(ConfigError, match="--pad must be 0 or more"):
        create_method("face", MethodSettings(pad=-1))


# -- color -----------------------------------------------------------------------------------


def test_parse_color():
    assert parse_color("#ffffff") == (255, 255, 255)
    assert parse_color("#f00") == (255, 0, 0)
    assert parse_color("white") == (255, 255, 255)
    assert parse_color(" 10, 20,30 ") == (10, 20, 30)
    for bad in ("blurple", "300,0,0", "#12"):
        with pytest.raises(ConfigError, match="cannot read the colour"):
            parse_color(bad)


def ring_image() -> np.ndarray:
    """White background, a red square with a white hole in the middle."""
    rgb = np.full((40, 40, 3), 255, dtype=np.uint8)
    rgb[10:30, 10:30] = (200, 30, 30)
    rgb[17:23, 17:23] = (250, 250, 250)
    return rgb


def test_color_background_and_border_only():
    rgb = ring_image()
    assert border_color(rgb) == (255, 255, 255)
    bg = background(rgb, (255, 255, 255), tolerance=10)
    assert bg[0, 0] and bg[20, 20] and not bg[12, 12]
    bg = background(rgb, (255, 255, 255), tolerance=10, border_only=True)
    assert bg[0, 0] and not bg[20, 20] and not bg[12, 12]
    assert int((~bg).sum()) == 20 * 20  # the square and its hole


def test_color_method_on_sample_portrait():
    # b_portrait: a near-white gradient background behind a figure
    mask = make("color", SAMPLES / "b_portrait.png", tolerance=30)
    assert mask.shape == (768, 512)
    assert mask[5, 5] == 0.0 and mask[760, 505] == 0.0  # background corners
    assert mask[230, 256] == 1.0  # the face
    assert 0.05 < mask.mean() < 0.5
    strict = make("color", SAMPLES / "b_portrait.png", color="#000000", tolerance=5)
    assert strict[5, 5] == 1.0  # nothing is black in the background
    opts = create_method("color", MethodSettings(color="white", tolerance=12)).options()
    assert opts == {"color": "#ffffff", "tolerance": 12, "border_only": False}


# -- import ----------------------------------------------------------------------------------


@pytest.fixture
def painted(tmp_path):
    images = tmp_path / "data"
    images.mkdir()
    Image.new("RGB", (64, 32), (9, 9, 9)).save(images / "a.jpg")
    Image.new("RGB", (64, 32), (9, 9, 9)).save(images / "b.png")
    Image.new("RGB", (64, 32), (9, 9, 9)).save(images / "c.png")
    masks = tmp_path / "painted"
    masks.mkdir()
    m = np.zeros((16, 32), dtype=np.uint8)  # half size, same aspect ratio
    m[:, 16:] = 255
    Image.fromarray(m, "L").save(masks / "a.png")
    Image.new("RGB", (64, 64), (255, 255, 255)).save(masks / "b.webp")  # wrong aspect ratio
    return images, masks


def test_import_resizes_same_aspect_and_lists_it(painted):
    images, masks = painted
    method = create_method("import", MethodSettings(source=masks))
    method.load()
    item = Item(images / "a.jpg")
    mask = method.make(load_image(item.path), item)
    assert mask.shape == (32, 64)
    assert mask[:, :30].max() == 0.0 and mask[:, 34:].min() == 1.0
    assert method.notes == ["a.jpg: a.png resized 32x16 -> 64x32"]
    assert method.inputs(item)["source"] == "a.png"


def test_import_rejects_another_aspect_ratio(painted):
    images, masks = painted
    method = create_method("import", MethodSettings(source=masks))
    item = Item(images / "b.png")
    with pytest.raises(ImageError) as err:
        method.make(load_image(item.path), item)
    assert err.value.reason == "mask b.webp is 64x64 but the image is 64x32 (aspect ratio 1.000 vs 2.000)"
    with pytest.raises(MaskNotFound, match=r"no mask named c\.\* in"):
        method.make(load_image(images / "c.png"), Item(images / "c.png"))


def test_import_reads_the_red_channel_and_transparency_as_black(tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 200, 50, 255
    rgba[0, 0, 3] = 0  # transparent pixel
    Image.fromarray(rgba, "RGBA").save(src / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    method = create_method("import", MethodSettings(source=src))
    mask = method.make(load_image(tmp_path / "x.png"), Item(tmp_path / "x.png"))
    assert mask[1, 1] == pytest.approx(200 / 255) and mask[0, 0] == 0.0


def test_import_two_masks_for_one_image_and_missing_folder(painted, tmp_path):
    images, masks = painted
    Image.new("L", (64, 32), 255).save(masks / "a.jpg")
    method = create_method("import", MethodSettings(source=masks))
    with pytest.raises(ImageError, match="several masks for this image in .*: a.jpg, a.png"):
        method.make(load_image(images / "a.jpg"), Item(images / "a.jpg"))
    with pytest.raises(ConfigError, match="no such folder of masks"):
        create_method("import", MethodSettings(source=tmp_path / "nope"))
    with pytest.raises(ConfigError, match="needs --from DIR"):
        create_method("import", MethodSettings())
