import json

import pytest

from sdprep.dataset import (
    Item,
    discover,
    dump_sidecar,
    format_repeat_folder,
    parse_repeat_folder,
    read_caption,
    read_sidecar,
    sdprep_meta,
    split_tags,
)
from sdprep.errors import CaptionError, DatasetError


def test_discovery_sorted_and_ignores_own_files(sample_dataset):
    (sample_dataset / ".sdprep").mkdir()
    (sample_dataset / ".sdprep" / "x.png").write_bytes(b"")
    (sample_dataset / "masks").mkdir()
    (sample_dataset / "masks" / "a_landscape.png").write_bytes(b"")
    (sample_dataset / "notes.txt").write_text("hi")
    (sample_dataset / "sub").mkdir()
    (sample_dataset / "sub" / "Z.PNG").write_bytes(b"")
    names = [i.name for i in discover(sample_dataset)]
    assert names == sorted(names) and len(names) == 8 and names[0] == "a_landscape.jpg"
    rec = [i.path.relative_to(sample_dataset).as_posix() for i in discover(sample_dataset, recursive=True)]
    assert rec[-1] == "sub/Z.PNG" and len(rec) == 9


def test_discover_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        discover(tmp_path / "nope")


def test_sidecar_is_gallery_dl_name_and_round_trip_keeps_unknown_keys(sample_dataset):
    item = Item(sample_dataset / "a_landscape.jpg")
    assert item.sidecar_path.name == "a_landscape.jpg.json"
    data = read_sidecar(item)
    assert data["category"] == "danbooru"
    data["user_key"] = {"nested": [1, 2]}
    sdprep_meta(data)["monochrome"] = None
    item.sidecar_path.write_text(dump_sidecar(data))
    again = read_sidecar(item)
    assert (
        again["user_key"] == {"nested": [1, 2]} and again["tag_string_general"] == data["tag_string_general"]
    )
    assert again["sdprep"] == {"monochrome": None}
    assert json.loads(item.sidecar_path.read_text()) == again


def test_invalid_sidecar_and_caption_encodings(tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    item = Item(img)
    item.sidecar_path.write_text("{not json")
    with pytest.raises(CaptionError, match="x.png.json: invalid JSON"):
        read_sidecar(item)
    item.caption_path.write_bytes("caf\xe9, tag".encode("latin-1"))
    with pytest.raises(CaptionError, match="x.txt: not UTF-8"):
        read_caption(item)
    item.caption_path.write_bytes("\ufeffone, two\n".encode())
    assert read_caption(item) == "one, two"


def test_json_bombs_and_huge_text_files_are_bad_files_not_crashes(tmp_path, monkeypatch):
    from sdprep import dataset

    item = Item(tmp_path / "x.png")
    item.sidecar_path.write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in json.loads
    with pytest.raises(CaptionError, match=r"x.png.json: invalid JSON \(line 1: nested too deeply\)"):
        read_sidecar(item)
    monkeypatch.setattr(dataset, "TEXT_MAX_BYTES", 1000)
    monkeypatch.setattr(dataset.read_text_file, "__defaults__", (1000,))
    item.caption_path.write_text("tag, " * 1000)
    with pytest.raises(CaptionError) as err:
        read_caption(item)
    assert err.value.reason == "5,000 bytes: too large for a caption or sidecar (the limit is 1,000)"
    assert "move it out of the dataset" in err.value.hint


def test_split_tags_normalises():
    assert split_tags(" a ,b,,  c  d ,\n") == ["a", "b", "c d"]
    assert split_tags(", , ,") == []


@pytest.mark.parametrize(
    "name, repeats, tokens",
    [("40_mytoken", 40, "mytoken"), ("10_high quality", 10, "high quality"), ("1_a_b_c", 1, "a_b_c")],
)
def test_repeat_folder_round_trip(name, repeats, tokens):
    parsed = parse_repeat_folder(name)
    assert (parsed.repeats, parsed.tokens) == (repeats, tokens)
    assert format_repeat_folder(repeats, tokens) == name
    assert parse_repeat_folder(format_repeat_folder(repeats, tokens)) == parsed


@pytest.mark.parametrize("name", ["images", "mytoken_40", "x_y", "40", "0_zero", "-3_neg"])
def test_non_repeat_folders(name):
    assert parse_repeat_folder(name) is None


def test_format_rejects_bad_tokens():
    with pytest.raises(DatasetError):
        format_repeat_folder(0, "x")
    with pytest.raises(DatasetError):
        format_repeat_folder(3, "a/b")


def test_an_integer_too_long_for_python_is_invalid_json_not_a_crash(tmp_path):
    """json.loads raises a plain ValueError past int max str digits (4,300): it aborted six stages."""
    item = Item(tmp_path / "x.png")
    item.sidecar_path.write_text('{"id": ' + "9" * 5000 + "}")
    with pytest.raises(
        CaptionError, match=r"x.png.json: invalid JSON \(line 1: an integer over 4,300 digits\)"
    ):
        read_sidecar(item)


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        (7, "sdprep is a number, expected an object"),
        ({"monochrome": 7}, "sdprep.monochrome is a number, expected a string or an object"),
        ({"monochrome": {"label": ["x"]}}, "sdprep.monochrome.label is a list, expected a string"),
        ({"wd14": {"scores": {"smile": "high"}}}, "sdprep.wd14.scores.smile is a string, expected a number"),
        ({"wd14": {"scores": {"smile": True}}}, "sdprep.wd14.scores.smile is true, expected a number"),
        ({"dedup": {"phash": 5}}, "sdprep.dedup.phash is a number, expected a hexadecimal string"),
        ({"dedup": {"phash": "xyz"}}, "sdprep.dedup.phash is a string, expected a hexadecimal string"),
        ({"dedup": {"size": [1, 2, 3]}}, "sdprep.dedup.size is a list, expected a list of 2 items"),
        ({"masks_face": {"path": None}}, "sdprep.masks_face.path is null, expected a string"),
        ({"booru": {"tags": {"general": [1]}}}, "sdprep.booru.tags.general.0 is a number, expected a string"),
    ],
)
def test_wrong_types_in_sdprep_records_name_the_sidecar_and_key(tmp_path, meta, problem):
    item = Item(tmp_path / "x.png")
    item.sidecar_path.write_text(json.dumps({"sdprep": meta}))
    with pytest.raises(CaptionError) as err:
        read_sidecar(item)
    assert err.value.path == item.sidecar_path
    assert err.value.reason == f"wrong type in the sidecar: {problem}"
    assert "delete its key" in err.value.hint


def test_records_of_the_right_types_and_unknown_keys_pass(tmp_path):
    item = Item(tmp_path / "x.png")
    meta = {
        "monochrome": "greyscale",
        "dedup": {"algo": "phash-8", "phash": "80ff", "size": [3, 4], "sharpness": 0.5, "file": [1, 2]},
        "wd14": {"scores": {"smile": 0.9, "solo": 1}, "categories": {"smile": "general"}},
        "mask": {"path": "masks/x.png", "coverage": 1},
        "future": {"anything": [None]},
    }
    item.sidecar_path.write_text(json.dumps({"sdprep": meta, "id": 7}))
    assert read_sidecar(item)["sdprep"] == meta


def test_a_utf16_caption_says_so(tmp_path):
    item = Item(tmp_path / "x.png")
    item.caption_path.write_bytes("1girl, smile\n".encode("utf-16"))
    with pytest.raises(CaptionError) as err:
        read_caption(item)
    assert err.value.reason == "not UTF-8 text (byte 0: it starts like UTF-16)"
    assert "re-save the file as UTF-8" in err.value.hint


def test_folder_in_the_way():
    from sdprep.dataset import folder_in_the_way

    assert folder_in_the_way("/nonexistent/masks") is None


def test_folder_in_the_way_names_files_and_links(tmp_path):
    from sdprep.dataset import folder_in_the_way

    (tmp_path / "masks").mkdir()
    assert folder_in_the_way(tmp_path / "masks") is None
    (tmp_path / "duplicates").write_text("x")
    assert folder_in_the_way(tmp_path / "duplicates") == (
        "a file named duplicates is where sdprep keeps its duplicates folder"
    )
    (tmp_path / "masks_face").symlink_to(tmp_path / "masks")
    assert folder_in_the_way(tmp_path / "masks_face").startswith("a symlink named masks_face")
