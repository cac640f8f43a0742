import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdprep import fileops
from sdprep.cli import cli
from sdprep.errors import ConfigError
from sdprep.prep import dedup
from sdprep.prep.dedup import DedupOptions, close_pairs, group, laplacian_variance, popcount, run_dedup


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".sdprep" not in p.parts
    }


@pytest.fixture
def with_copies(sample_dataset: Path) -> Path:
    """The sample images plus three near-duplicates: a half-size copy, a blurred copy, a re-encode."""
    with Image.open(sample_dataset / "a_landscape.jpg") as im:
        im.resize((384, 256), Image.LANCZOS).save(sample_dataset / "a_small.png")
    with Image.open(sample_dataset / "b_portrait.png") as im:
        im.filter(ImageFilter.GaussianBlur(2)).save(sample_dataset / "b_blurred.png")
        im.convert("RGB").save(sample_dataset / "b_copy.jpg", quality=70)
    (sample_dataset / "a_small.txt").write_text("small copy\n")
    (sample_dataset / "masks").mkdir()
    Image.new("L", (384, 256), 255).save(sample_dataset / "masks" / "a_small.png")
    (sample_dataset / "masks_face").mkdir()
    Image.new("L", (384, 256), 128).save(sample_dataset / "masks_face" / "a_small.png")
    return sample_dataset


def test_popcount_pairs_and_groups_match_brute_force():
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(1100)]
    for i in range(0, 1000, 97):  # plant near-duplicates across the 512-row tiles
        hashes[i + 50] = hashes[i] ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64))
    arr = np.array(hashes, dtype=np.uint64)
    assert popcount(arr[:5]).tolist() == [bin(h).count("1") for h in hashes[:5]]
    brute = {
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if bin(hashes[i] ^ hashes[j]).count("1") <= 2
    }
    assert set(close_pairs(arr, 2)) == brute and len(brute) >= 10
    assert group([0b0, 0b1, 0b11, 0xFF00], 1) == [[0, 1, 2]]  # chained through 0b1
    assert laplacian_variance(np.zeros((4, 4))) == 0.0
    with pytest.raises(ConfigError, match="--threshold must be 0-32"):
        DedupOptions(threshold=40)


def brute_force_groups(hashes: list[int], threshold: int) -> list[list[int]]:
    """The definition, spelled out: connected components of "Hamming distance <= threshold"."""
    n = len(hashes)
    near = [
        [j for j in range(n) if j != i and bin(hashes[i] ^ hashes[j]).count("1") <= threshold]
        for i in range(n)
    ]
    seen, groups = set(), []
    for start in range(n):
        if start in seen:
            continue
        component, todo = {start}, [start]
        while todo:
            for j in near[todo.pop()]:
                if j not in component:
                    component.add(j)
                    todo.append(j)
        seen |= component
        if len(component) > 1:
            groups.append(sorted(component))
    return groups


def clustered_hashes(rng: random.Random, n: int, centres: int, radius: int, share: float) -> list[int]:
    """Random hashes, `share` of them within `radius` bits of one of `centres` random centres."""
    hubs = [rng.getrandbits(64) for _ in range(centres)]
    out = []
    for _ in range(n):
        if rng.random() < share:
            h = rng.choice(hubs)
            for bit in rng.sample(range(64), rng.randint(0, radius)):
                h ^= 1 << bit
            out.append(h)
        else:
            out.append(rng.getrandbits(64))
    return out


def chain_hashes(rng: random.Random, n: int) -> list[int]:
    """Random hashes with three planted chains (a~b, b~c, a!~c at threshold 1), shuffled into place."""
    hashes = [rng.getrandbits(64) for _ in range(n)]
    slots = rng.sample(range(n), 3 * 40)
    for c in range(3):
        h = rng.getrandbits(64)
        for k, bit in enumerate(rng.sample(range(64), 40)):  # k links apart = k bits apart
            hashes[slots[c * 40 + k]] = h
            h ^= 1 << bit
    return hashes


@pytest.mark.parametrize("block, batch", [(dedup.BLOCK, dedup.MERGE_BATCH), (64, 1), (64, 50)])
def test_group_equals_brute_force_on_random_clustered_and_chained(monkeypatch, block, batch):
    """Many tiles and many small merge batches (64, 1) must give exactly what one pass gives."""
    monkeypatch.setattr(dedup, "BLOCK", block)
    monkeypatch.setattr(dedup, "MERGE_BATCH", batch)
    rng = random.Random(7)
    cases = {
        "random": ([rng.getrandbits(64) for _ in range(700)], 6),
        "clustered": (clustered_hashes(rng, 700, 12, 3, 0.6), 4),  # members up to 6 apart: joined by chains
        "dense": (clustered_hashes(rng, 600, 1, 2, 0.5), 2),
        "chains": (chain_hashes(rng, 700), 1),
        "identical": ([5, 9, 5, 1 << 40, 9, 5, 12345, 1 << 40], 0),
    }
    for name, (hashes, threshold) in cases.items():
        expected = brute_force_groups(hashes, threshold)
        assert group(hashes, threshold) == expected, name
    assert len(brute_force_groups(*cases["clustered"])) >= 10
    chains = brute_force_groups(*cases["chains"])
    assert sorted(len(g) for g in chains)[-3:] == [40, 40, 40]  # every chain is one group
    chained = cases["chains"][0]
    for g in chains:  # ... although its ends are far apart: only transitivity joins them
        assert len(g) < 40 or max(bin(chained[g[0]] ^ chained[i]).count("1") for i in g) >= 20
    assert group([], 6) == [] and group([3], 6) == [] and group([3, 3], 0) == [[0, 1]]
    assert group([2**64 - 1, 2**64 - 2], 1) == [[0, 1]]  # the full unsigned range


def test_keeps_largest_then_sharpest_moves_companions_undo(with_copies, monkeypatch):
    root = with_copies
    before = tree(root)
    result = run_dedup(root, DedupOptions())
    assert (result.changed, result.skipped, result.failed) == (3, 8, [])
    groups = {keep.name: sorted(p.name for p, _ in dups) for keep, dups in result.details["groups"]}
    assert groups == {"a_landscape.jpg": ["a_small.png"], "b_portrait.png": ["b_blurred.png", "b_copy.jpg"]}
    dup_dir = root / "duplicates"
    assert sorted(p.name for p in dup_dir.iterdir() if p.is_file()) == [
        "a_small.png",
        "a_small.png.json",
        "a_small.txt",
        "b_blurred.png",
        "b_blurred.png.json",
        "b_copy.jpg",
        "b_copy.jpg.json",
    ]
    assert (dup_dir / "masks" / "a_small.png").exists()
    assert (dup_dir / "masks_face" / "a_small.png").exists()
    assert not (root / "masks_face" / "a_small.png").exists()
    side = json.loads((dup_dir / "b_blurred.png.json").read_text())
    assert side["sdprep"]["duplicate_of"] == "b_portrait.png"
    kept = json.loads((root / "a_landscape.jpg.json").read_text())
    assert kept["id"] == 1001 and len(kept["sdprep"]["dedup"]["phash"]) == 16  # gallery-dl keys kept

    # a rerun reads the cached hashes: no image is decoded, nothing changes
    monkeypatch.setattr(dedup, "load_image", lambda *a, **k: pytest.fail("decoded an image"))
    again = run_dedup(root, DedupOptions())
    assert (again.changed, again.skipped) == (0, 8)
    monkeypatch.undo()

    fileops.undo(root)
    assert tree(root) == before


def test_dry_run_cli_lists_groups_and_changes_nothing(with_copies, cli_runner):
    before = tree(with_copies)
    res = cli_runner.invoke(cli, ["-q", "dedup", str(with_copies), "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "keep a_landscape.jpg"
    assert lines[1].startswith("  duplicate a_small.png (distance ")
    assert lines[2] == "keep b_portrait.png"
    assert "dedup: 0 changed, 11 skipped, 0 failed" in res.output
    assert tree(with_copies) == before
    res = cli_runner.invoke(cli, ["-q", "dedup", str(with_copies), "--threshold", "0"])
    assert res.exit_code == 0


def test_broken_image_is_a_failure_not_a_crash(tmp_path, cli_runner):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"")
    res = cli_runner.invoke(cli, ["-q", "dedup", str(tmp_path)])
    assert res.exit_code == 1
    assert f"  failed: {tmp_path / 'broken.png'}: empty file (0 bytes)" in res.output


def test_recursive_finds_duplicates_across_folders_and_skips_duplicates_dir(tmp_path):
    rng = np.random.default_rng(1)
    noise = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for sub in ["1_a", "2_b"]:
        (tmp_path / sub).mkdir()
        noise.save(tmp_path / sub / "x.png")
    assert run_dedup(tmp_path, DedupOptions(recursive=True)).changed == 1
    assert (tmp_path / "duplicates" / "2_b" / "x.png").exists()
    assert run_dedup(tmp_path, DedupOptions(recursive=True)).changed == 0


def test_a_file_named_duplicates_stops_dedup_before_any_move(tmp_path):
    from PIL import Image

    from sdprep.errors import DatasetError
    from sdprep.prep.dedup import DedupOptions, run_dedup

    for n in range(3):
        Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / f"g{n}.png")
    (tmp_path / "duplicates").write_text("mine")
    with pytest.raises(DatasetError) as err:
        run_dedup(tmp_path, DedupOptions())
    assert err.value.message == (
        f"{tmp_path / 'duplicates'}: a file named duplicates is where sdprep keeps its duplicates folder"
    )
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["g0.png", "g1.png", "g2.png"]
    assert (tmp_path / "duplicates").read_text() == "mine"


def test_a_duplicate_sharing_its_stem_leaves_the_shared_caption_with_the_kept_image(tmp_path):
    """a.png kept, a.jpg (its smaller copy) moved: the one a.txt is a.png's too, so it stays."""
    from PIL import Image

    from sdprep import fileops
    from sdprep.prep.dedup import DedupOptions, run_dedup

    im = Image.open(Path(__file__).parent.parent / "sample_data" / "images" / "a_landscape.jpg").convert(
        "RGB"
    )
    im.save(tmp_path / "a.png")
    im.resize((im.width // 2, im.height // 2)).save(tmp_path / "a.jpg", quality=95)
    (tmp_path / "a.txt").write_text("1girl, smile\n")
    (tmp_path / "masks").mkdir()
    Image.new("L", im.size, 255).save(tmp_path / "masks" / "a.png")
    result = run_dedup(tmp_path, DedupOptions())
    assert result.changed == 1
    assert "  a.jpg shares its caption/mask with another image of its stem: they stay" in result.notes
    assert sorted(p.name for p in (tmp_path / "duplicates").iterdir()) == ["a.jpg", "a.jpg.json"]
    assert (tmp_path / "a.txt").read_text() == "1girl, smile\n"
    assert (tmp_path / "masks" / "a.png").is_file()
    fileops.undo(tmp_path)
    assert (tmp_path / "a.jpg").is_file() and not (tmp_path / "duplicates" / "a.jpg").exists()
