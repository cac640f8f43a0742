"""A hostile dataset generated on the fly: broken, odd and malicious files mixed with good images.

Imported by the reliability, crash and security tests; nothing here is committed data. `build()`
writes the corpus into a folder and returns a `Corpus` that says which names are good images, which
image files are bad (and why), which companions are bad, and where the outside world is (files a
symlink points at, which no stage may read or change).

Unreadable files: tests run as root here, and root ignores permission bits. `reader_prefix()`
returns a command prefix that drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH with `setpriv`, so a
CLI subprocess started through it gets EACCES on a mode-000 file even as root (uid stays 0, so
everything else it owns stays writable). When not root, no prefix is needed.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_data" / "images"
SAMPLE_NAMES = sorted(p.name for p in SAMPLES.iterdir() if not p.name.endswith(".json"))

SECRET_TEXT = "s3cr3t-outside-the-dataset-0xC0FFEE"  # content of files outside the dataset

# Good images under awkward names (copies of sample images, shrunk).
AWKWARD_NAMES = {
    "my photo 01.png": "b_portrait.png",
    "café ünï 日本.png": "c_square.webp",
    "-dash.jpg": "a_landscape.jpg",
    "--help.png": "h_wide.jpg",
    "new\nline.png": "d_greyscale.png",
}

# Good images that exercise the loader: first frames, modes, EXIF, misnamed formats.
ODD_GOOD = (
    "cmyk.jpg",
    "deep16.png",
    "palette_alpha.png",
    "anim_gif.gif",
    "anim_webp.webp",
    "exif_rotated.jpg",
    "jpeg_named.png",
    "one_px.png",
)

# Bad image files: every stage that reads images must list these as failures.
BAD_IMAGES = {
    "zero.png": "empty file",
    "trunc_jpg.jpg": "truncated",
    "trunc_png.png": "truncated",
    "text.png": "not an image",
    "bomb.png": "decompression limit",
    "noread.png": "permission denied",
    "loop.png": "symlink loop",
    "outside.png": "symlink out of the dataset",
}


# Good images whose sidecar is valid JSON that no stage can use.
BAD_SIDECARS = {
    "big_int.png": '{"id": ' + "7" * 5000 + "}\n",
    "wrong_type.png": '{"sdprep": {"monochrome": 7, "wd14": {"scores": {"smile": "high"}}}}\n',
}


# A good image whose name is not UTF-8 (bytes 0xFF 0xFE): every command processes it.
NOT_UTF8 = os.fsdecode(b"name\xff\xfe.png")
# A good image whose caption hides its tags: zero-width space, soft hyphen, fullwidth letters, CRLF.
HIDDEN_CAPTION = (
    "hidden.png",
    "1girl,\u200b sm\u00adile\r\nsolo, \uff4f\uff55\uff54\uff44\uff4f\uff4f\uff52\uff53\r\n",
)
# Two different pictures with one stem (one clash.txt): stages that go by stem list both.
STEM_CLASH = ["clash.jpg", "clash.png"]
# A 1x20000 strip: fine as it is; upscaled to a 200 px short side it would be 4,000,000 px long.
STRIP = "strip.png"


@dataclass
class Corpus:
    root: Path
    outside: Path  # a folder beside the dataset that symlinks point into
    good: list[str] = field(default_factory=list)  # image names every image stage must process
    bad_images: dict[str, str] = field(default_factory=dict)
    bad_captions: dict[str, str] = field(default_factory=dict)  # caption/sidecar file -> reason
    bad_sidecars: dict[str, str] = field(default_factory=dict)
    bad_masks: dict[str, str] = field(default_factory=dict)  # mask file (in masks/) -> reason
    unreadable: list[str] = field(default_factory=list)
    clashes: list[str] = field(default_factory=list)  # images sharing a stem (neither good nor bad)

    def path(self, name: str) -> Path:
        return self.root / name


# -- image bytes -------------------------------------------------------------------------------


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@cache
def _sample(name: str, side: int = 160) -> Image.Image:
    """A sample image shrunk to `side` on its long edge (small files keep every stage fast)."""
    with Image.open(SAMPLES / name) as im:
        im = im.copy()
    im.thumbnail((side, side), Image.LANCZOS)
    return im


def sample_bytes(name: str, fmt: str | None = None, side: int = 160) -> bytes:
    im = _sample(name, side)
    fmt = fmt or {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[Path(name).suffix]
    if fmt == "JPEG" and im.mode != "RGB":
        im = im.convert("RGB")
    return _encode(im, fmt, quality=90) if fmt in ("JPEG", "WEBP") else _encode(im, fmt)


def variant(name: str, n: int) -> Image.Image:
    """A sample image changed enough (mirrored, rotated, channels swapped) not to be its duplicate."""
    im = _sample(name).convert("RGB")
    ops = [Image.FLIP_LEFT_RIGHT, Image.FLIP_TOP_BOTTOM, Image.ROTATE_90, Image.ROTATE_180, Image.TRANSPOSE]
    im = im.transpose(ops[n % len(ops)])
    r, g, b = im.split()
    return Image.merge("RGB", (b, r, g) if n % 2 else (g, b, r))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@cache
def bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 M pixels at 20,000) in about 50 KB."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row * 500) for _ in range(side // 500)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def odd_image_bytes(name: str) -> bytes:
    """The bytes of one of ODD_GOOD."""
    i = ODD_GOOD.index(name)
    base = variant(SAMPLE_NAMES[i % len(SAMPLE_NAMES)], i)  # each a different picture (no duplicates)
    if name == "cmyk.jpg":
        return _encode(base.convert("CMYK"), "JPEG", quality=90)
    if name == "deep16.png":
        grey = base.convert("L")
        deep = Image.frombytes("I;16", grey.size, bytes(b for v in grey.tobytes() for b in (v, v)))
        return _encode(deep, "PNG")
    if name == "palette_alpha.png":
        pal = base.convert("P", palette=Image.ADAPTIVE, colors=16)
        return _encode(pal, "PNG", transparency=0)
    if name in ("anim_gif.gif", "anim_webp.webp"):
        frames = [base, base.transpose(Image.FLIP_LEFT_RIGHT), base.rotate(90)]
        fmt = "GIF" if name.endswith(".gif") else "WEBP"
        return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    if name == "exif_rotated.jpg":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise on display
        wide = _sample("h_wide.jpg", 160).convert("RGB")
        return _encode(wide, "JPEG", quality=90, exif=exif.tobytes())
    if name == "jpeg_named.png":
        return _encode(base, "JPEG", quality=90)
    if name == "one_px.png":
        return _encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG")
    raise KeyError(name)


# -- the corpus --------------------------------------------------------------------------------


def _caption(name: str, tags: str) -> bytes:
    return (tags + "\n").encode("utf-8")


def build(root: Path, *, outside: Path | None = None, unreadable: bool = True) -> Corpus:
    """Write the hostile corpus into `root` (created) and return what it holds.

    `outside` (default: `root.parent / "outside"`) receives files that symlinks in the dataset
    point at; their content is SECRET_TEXT (or a valid image) so tests can check nothing leaks.
    """
    root.mkdir(parents=True, exist_ok=True)
    outside = outside or root.parent / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    c = Corpus(root=root, outside=outside)

    # Good: the sample images (shrunk) with their gallery-dl sidecars and simple captions.
    for name in SAMPLE_NAMES:
        (root / name).write_bytes(sample_bytes(name))
        shutil.copyfile(SAMPLES / f"{name}.json", root / f"{name}.json")
        c.good.append(name)
    for n, (name, src) in enumerate(AWKWARD_NAMES.items()):
        (root / name).write_bytes(_encode(variant(src, n), "PNG" if name.endswith(".png") else "JPEG"))
        (root / Path(name).with_suffix(".txt")).write_bytes(_caption(name, "1girl, solo, smile"))
        c.good.append(name)
    for name in ODD_GOOD:
        (root / name).write_bytes(odd_image_bytes(name))
        c.good.append(name)

    # Captions: good ones, a BOM, an empty one, separators only, and a Latin-1 one (bad).
    (root / "b_portrait.txt").write_bytes(b"\xef\xbb\xbf" + _caption("", "1girl, solo, long hair"))
    (root / "c_square.txt").write_bytes(b"")
    (root / "d_greyscale.txt").write_bytes(b" , ,,  ,\n")
    (root / "g_tiny.txt").write_bytes(_caption("", "1girl, solo, blue eyes, smile"))
    (root / "h_wide.txt").write_bytes(_caption("", "1girl, outdoors, sky, smile"))
    (root / "a_landscape.txt").write_bytes("1girl, café, smile\n".encode("latin-1"))
    c.bad_captions["a_landscape.txt"] = "not UTF-8"

    # A sidecar with invalid JSON (its image is fine).
    (root / "e_sepia.jpg.json").write_bytes(b'{"tag_string": "1girl solo", \n')
    c.bad_sidecars["e_sepia.jpg.json"] = "invalid JSON"
    # Valid JSON that Python's json cannot hold (an int past 4,300 digits), and sdprep's own record
    # of the wrong type: good images, each with a bad sidecar.
    for n, (name, text) in enumerate(BAD_SIDECARS.items()):
        (root / name).write_bytes(_encode(variant(SAMPLE_NAMES[n + 1], 7 + n), "PNG"))
        (root / f"{name}.json").write_text(text)
        c.good.append(name)
        c.bad_sidecars[f"{name}.json"] = text[:40]

    # Masks: one of the right size, one of the wrong size.
    masks = root / "masks"
    masks.mkdir()
    Image.new("L", _sample("g_tiny.png").size, 255).save(masks / "g_tiny.png")
    Image.new("L", (17, 23), 255).save(masks / "f_transparent.png")
    c.bad_masks["f_transparent.png"] = "wrong size"

    # Bad images.
    (root / "zero.png").write_bytes(b"")
    jpeg = sample_bytes("a_landscape.jpg", "JPEG")
    png = sample_bytes("b_portrait.png", "PNG")
    (root / "trunc_jpg.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "trunc_png.png").write_bytes(png[: len(png) // 2])
    (root / "text.png").write_bytes(b"this is not a picture, just text\n" * 4)
    (root / "bomb.png").write_bytes(bomb_png())
    (root / "noread.png").write_bytes(png)
    (root / "loop.png").symlink_to("loop.png")
    (outside / "outside.png").write_bytes(png)
    (root / "outside.png").symlink_to(outside / "outside.png")
    c.bad_images.update(BAD_IMAGES)
    if unreadable:
        (root / "noread.png").chmod(0)
        c.unreadable.append("noread.png")
    else:
        del c.bad_images["noread.png"]
        c.good.append("noread.png")

    # A good image whose caption is a symlink to a secret outside the dataset.
    (outside / "secret.txt").write_text(SECRET_TEXT + "\n")
    (root / "leak.png").write_bytes(_encode(variant("g_tiny.png", 3), "PNG"))
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    c.good.append("leak.png")
    c.bad_captions["leak.txt"] = "symlink out of the dataset"

    # Round two (issue 18): an odd name, a caption hiding its tags, a stem clash, a long strip.
    (root / NOT_UTF8).write_bytes(_encode(variant(SAMPLE_NAMES[4], 13), "PNG"))
    (root / NOT_UTF8[:-4]).with_suffix(".txt").write_text("1girl, smile\n")
    c.good.append(NOT_UTF8)
    name, text = HIDDEN_CAPTION
    (root / name).write_bytes(_encode(variant(SAMPLE_NAMES[6], 17), "PNG"))
    (root / name).with_suffix(".txt").write_bytes(text.encode("utf-8"))
    c.good.append(name)
    (root / STEM_CLASH[0]).write_bytes(_encode(variant(SAMPLE_NAMES[2], 19), "JPEG", quality=90))
    (root / STEM_CLASH[1]).write_bytes(_encode(variant(SAMPLE_NAMES[3], 23), "PNG"))
    (root / "clash.txt").write_text("1girl, solo, smile\n")
    c.clashes += STEM_CLASH
    (root / STRIP).write_bytes(_encode(Image.new("RGB", (1, 20000), (40, 90, 160)), "PNG"))
    c.good.append(STRIP)
    return c


def plain(root: Path, n: int = 4, *, masks: bool = False) -> Corpus:
    """A small clean dataset: `n` sample images with a caption each (and a full mask each).

    Tests that study one odd file add it to this; `outside` is created empty beside the dataset.
    """
    root.mkdir(parents=True)
    c = Corpus(root=root, outside=root.parent / "outside")
    c.outside.mkdir()
    if masks:
        (root / "masks").mkdir()
    for name in SAMPLE_NAMES[:n]:
        (root / name).write_bytes(sample_bytes(name))
        (root / Path(name).with_suffix(".txt")).write_text("1girl, solo, smile\n")
        if masks:
            Image.new("L", _sample(name).size, 255).save(root / "masks" / f"{Path(name).stem}.png")
        c.good.append(name)
    return c


# -- running and comparing ---------------------------------------------------------------------


def snapshot(root: Path, *, skip: tuple[str, ...] = (".sdprep",)) -> dict[str, str]:
    """Relative path -> sha256 of content (or 'link:target', 'dir'), for every entry under `root`.

    Symlinks are recorded, not followed; unreadable files are read anyway (the test runs as root
    or owns them: it restores read permission for a moment when needed).
    """
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not (rel_dir == Path(".") and d in skip))
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = (rel_dir / name).as_posix()
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = _hash(path)
    return out


def _hash(path: Path) -> str:
    mode = path.stat().st_mode & 0o777
    if not os.access(path, os.R_OK):
        path.chmod(0o600)
        try:
            return f"{hashlib.sha256(path.read_bytes()).hexdigest()}:{mode:o}"
        finally:
            path.chmod(mode)
    return f"{hashlib.sha256(path.read_bytes()).hexdigest()}:{mode:o}"


def reader_prefix() -> list[str]:
    """A command prefix under which a mode-000 file cannot be read, even by root (see module doc)."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def can_drop_read_permission() -> bool:
    """True when reader_prefix() really makes a mode-000 file unreadable on this machine."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile() as f:
        os.chmod(f.name, 0)
        try:
            done = subprocess.run([*reader_prefix(), "cat", f.name], capture_output=True)
        except OSError:
            return False
        return done.returncode != 0


# -- a plain dataset of many small images (load tests and benchmarks/bench_load.py) --------------

VOCABULARY = [f"tag{i:03d}" for i in range(200)] + ["1girl", "solo", "smile", "long hair", "outdoors"]


def small_dataset(root: Path, n: int, side: int = 64) -> Path:
    """`n` distinct side x side PNGs named img_000001.png... with a 6-15 tag caption each."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        # a smooth random pattern: distinct perceptual hashes (no accidental duplicate groups)
        pattern = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        im = Image.fromarray(pattern).resize((side, side), Image.BICUBIC)
        name = f"img_{i:06d}"
        im.save(root / f"{name}.png", compress_level=1)
        tags = ["1girl", "solo"] + [VOCABULARY[(i * 7 + k * 13) % 200] for k in range(4 + i % 10)]
        if i % 3 == 0:
            tags.append("smile")
        (root / f"{name}.txt").write_text(", ".join(tags) + "\n", encoding="utf-8")
    return root


def open_fds() -> int:
    """Open file descriptors of this process (Linux)."""
    return len(os.listdir("/proc/self/fd"))


# -- a hostile .sdprep/ ------------------------------------------------------------------------

# sdprep's own state paths a downloaded dataset could bring as symlinks, and whether each is a folder
STATE_LINKS = {
    ".sdprep": True,
    ".sdprep/lock": False,
    ".sdprep/journal": True,
    ".sdprep/scrape/incoming": True,
    ".sdprep/convert-verified.json": False,
}


def plant_state_link(root: Path, rel: str, outside: Path) -> Path:
    """Make the state path `rel` of the dataset at `root` a symlink into `outside`, where a folder
    with a file and a sub-folder (or a file) of SECRET_TEXT waits; returns the link. No sdprep
    command may read, change or delete anything there."""
    link = root / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)  # what sdprep made there is replaced by the planted link
    elif os.path.lexists(link):
        link.unlink()
    target = outside / ("state-" + rel.replace("/", "_").lstrip("."))
    if STATE_LINKS[rel]:
        (target / "sub").mkdir(parents=True, exist_ok=True)
        (target / "secret.txt").write_text(SECRET_TEXT + "\n")
        (target / "sub" / "a.png").write_bytes(sample_bytes("b_portrait.png"))
        (target / "lock").write_text(SECRET_TEXT + "\n")
    else:
        target.write_text(SECRET_TEXT + "\n")
    link.symlink_to(target, target_is_directory=STATE_LINKS[rel])
    return link
