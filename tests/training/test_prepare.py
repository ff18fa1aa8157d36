"""Fast tests of the data preparation and pretraining wrapper on tiny synthetic fixtures (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmserve.fileio import sha256_file
from training.prepare import captions, clipart, emoji, render, splits, tuxpaint
from training.prepare.pretrain_pairs import Pair, split_pairs, write_caption_csv

SQUARE = '<path fill="{color}" d="M2 2h12v12H2z"/>'
STYLE_COLORS = {"noto": "#f00", "twemoji": "#0a0", "openmoji": "#00f", "fluent-emoji-flat": "#fa0",
                "fluent-emoji": "#a0f", "fluent-emoji-high-contrast": "currentColor"}
# (hexcode as the sources spell it, name, subgroup index, tags)
EMOJI = [
    ("1F600", "grinning face", 0, ["face", "grin"]),
    ("1F603", "grinning face with big eyes", 0, ["face", "mouth"]),
    ("1F604", "grinning face with smiling eyes", 0, ["face", "eye"]),
    ("263A-FE0F", "smiling face", 0, ["face", "relaxed"]),
    ("1F412", "monkey", 1, ["animal", "monkey"]),
    ("1F415", "dog", 1, ["animal", "pet"]),
    ("1F408", "cat", 1, ["animal", "pet"]),
    ("1F40E", "horse", 1, ["animal", "racing"]),
    ("1F34E", "red apple", 2, ["fruit"]),  # only 1 emoji in its subgroup: dropped with min_per_class=2
]


def make_npm_tree(root: Path) -> Path:
    """A miniature node_modules with emojibase-data, six iconify sets and openmoji line art."""
    nm = root / "node_modules"
    (nm / "emojibase-data" / "en").mkdir(parents=True)
    (nm / "emojibase-data" / "meta").mkdir(parents=True)
    data = [{"label": "regional indicator A", "hexcode": "1F1E6", "emoji": "x", "type": 1, "version": 0}]
    data += [{"label": n, "hexcode": h, "emoji": h, "group": 0 if s == 0 else 1, "subgroup": s, "tags": t}
             for h, n, s, t in EMOJI]
    (nm / "emojibase-data" / "en" / "data.json").write_text(json.dumps(data))
    meta = {"groups": {"0": "smileys-emotion", "1": "animals-nature"},
            "subgroups": {"0": "face-smiling", "1": "animal-mammal", "2": "food-fruit"}}
    (nm / "emojibase-data" / "meta" / "groups.json").write_text(json.dumps(meta))
    for package, color in STYLE_COLORS.items():
        d = nm / "@iconify-json" / package
        d.mkdir(parents=True)
        icons = {f"e{i}": {"body": SQUARE.format(color=color)} for i in range(len(EMOJI))}
        icons["e0"] = {"body": SQUARE.format(color=color), "width": 32}  # non-square: must be padded
        aliases = {"e1-flipped": {"parent": "e1", "hFlip": True}}
        (d / "icons.json").write_text(json.dumps({"prefix": package, "icons": icons, "aliases": aliases,
                                                  "width": 16, "height": 16}))
        chars = {h.lower(): f"e{i}" for i, (h, *_rest) in enumerate(EMOJI)}
        chars["1f603"] = "e1-flipped"
        (d / "chars.json").write_text(json.dumps({} if package == "fluent-emoji" else chars))
    line = nm / "openmoji" / "black" / "svg"
    line.mkdir(parents=True)
    for h, *_rest in EMOJI:
        line.joinpath(f"{h}.svg").write_text(
            '<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg">'
            '<circle cx="36" cy="36" r="20" fill="none" stroke="#000" stroke-width="4"/></svg>')
    return nm


def make_openclipart(root: Path) -> Path:
    """Two openclipart drawings (PNG on a big transparent page + SVG metadata), one with a boilerplate title."""
    for rel, title, kws in (("animals/mammals/housecats/cat_someone_01", "Cute cat", ["cat", "hash", "animal"]),
                            ("computer/icons/flat-theme/edit_copy", "Part of the Flat Icon Collection (Wed)",
                             ["icons", "action"])):
        png = root / "png" / f"{rel}.png"
        svg = root / "svg" / f"{rel}.svg"
        png.parent.mkdir(parents=True, exist_ok=True)
        svg.parent.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
        img.paste((200, 0, 0, 255), (20, 30, 60, 50))
        img.save(png)
        lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in kws)
        svg.write_text(f'<svg xmlns="http://www.w3.org/2000/svg"><metadata><cc:Work><dc:title>{title}</dc:title>'
                       f"<dc:subject><rdf:Bag>{lis}</rdf:Bag></dc:subject></cc:Work>"
                       "<dc:creator><cc:Agent><dc:title>someone</dc:title></cc:Agent></dc:creator></metadata>"
                       '<rect x="1" y="1" width="5" height="5"/></svg>')
    return root


def make_tuxpaint(root: Path) -> Path:
    """Three stamps: a PNG, its mirror copy (skipped) and an SVG sized in pt without viewBox."""
    d = root / "animals" / "birds"
    d.mkdir(parents=True)
    img = Image.new("RGBA", (50, 80), (0, 0, 0, 0))
    img.paste((0, 0, 255, 255), (10, 10, 40, 70))
    img.save(d / "crow.png")
    img.save(d / "crow_mirror.png")
    (d / "crow.txt").write_text("A crow.\nfr.utf8=Un corbeau.\n")
    (d / "owl.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="30pt" height="30pt">'
                               '<circle cx="20" cy="20" r="15" fill="#852"/></svg>')
    (d / "owl.txt").write_text("An owl.\n")
    return root


def test_folder_subgroup_takes_the_longest_mapped_folder() -> None:
    from training.prepare.folder_classes import folder_subgroup

    assert folder_subgroup("openclipart", "animals/mammals") == "animal-mammal"
    assert folder_subgroup("openclipart", "animals/mammals/big_cats") == "animal-mammal"
    assert folder_subgroup("openclipart", "animals") is None  # a mixed folder carries no class
    assert folder_subgroup("tuxpaint", "vehicles/auto") == "transport-ground"
    assert folder_subgroup("tuxpaint", "vehicles/flight") == "transport-air"
    assert folder_subgroup("tuxpaint", "vehicles/ship") is None  # taken back out of vehicles
    assert folder_subgroup("tuxpaint", "symbols/alphabets/english") == "alphanum"
    assert folder_subgroup("tuxpaint", "symbols/alphabets/asl") is None
    assert folder_subgroup("emoji_openmoji", "animals/mammals") is None


def test_normalise_hexcode_and_class_name() -> None:
    assert emoji.normalise_hexcode("263a-fe0f") == "263A"
    assert emoji.normalise_hexcode("1F3F3-FE0F-200D-1F308") == "1F3F3-200D-1F308"
    assert emoji.class_name("animal-mammal") == "animal mammal"
    assert emoji.class_name("alphanum") == "letters and numbers"


def test_to_white_square_crops_alpha_and_pads() -> None:
    img = Image.new("RGBA", (300, 100), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (10, 10, 50, 30))
    out = render.to_white_square(render.crop_to_content(img), 32)
    assert out.size == (32, 32) and out.mode == "RGB"
    assert out.getpixel((16, 16)) == (255, 0, 0)
    assert out.getpixel((16, 1)) == (255, 255, 255)  # 40x20 content padded top and bottom with white


def test_render_svg_pads_non_square_and_rejects_blank() -> None:
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 16">'
           '<rect width="32" height="16" fill="#00f"/></svg>')
    out = render.render_svg(svg, 24)
    assert out.size == (24, 24)
    assert out.getpixel((12, 12))[2] > 200 and out.getpixel((12, 1)) == (255, 255, 255)
    with pytest.raises(render.RenderError):
        render.render_svg('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8"></svg>', 16)


def test_fix_svg_size_adds_viewbox() -> None:
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="30pt" height="15pt"><rect width="9" height="9"/></svg>'
    fixed = render.fix_svg_size(svg)
    assert 'viewBox="0 0 40.000 20.000"' in fixed and 'width="40.000"' in fixed
    assert render.fix_svg_size('<svg viewBox="0 0 1 1" width="1pt"/>') == '<svg viewBox="0 0 1 1" width="1pt"/>'


def test_iconify_alias_flip_and_chars_fallback(tmp_path: Path) -> None:
    nm = make_npm_tree(tmp_path)
    flat = emoji.IconifySet(nm, "fluent-emoji-flat")
    svg = flat.svg("1F603")
    assert 'transform="translate(16 0) scale(-1 1)"' in svg and 'viewBox="0 0 16 16"' in svg
    assert 'viewBox="0 0 32 16"' in flat.svg("1F600")
    colour = emoji.IconifySet(nm, "fluent-emoji")  # empty chars.json: uses fluent-emoji-flat's mapping
    assert colour.hexcodes() == flat.hexcodes()
    assert "263A" in colour.hexcodes()


def test_select_task_emoji_needs_all_styles_and_class_size(tmp_path: Path) -> None:
    nm = make_npm_tree(tmp_path)
    info = emoji.load_emojibase(nm)
    assert "1F1E6" not in info and info["263A"].subgroup == "face-smiling"
    styles = emoji.load_styles(nm)
    chosen = emoji.select_task_emoji(info, styles, min_per_class=2)
    assert len(chosen) == 8 and "1F34E" not in chosen


def test_captions_contain_class_words_and_are_tsv_safe() -> None:
    caps = captions.emoji_captions("dog face", "animal mammal", ["dog", "face", "pet"])
    assert any("animal mammal" in c for c in caps) and "an emoji of dog face" in caps
    assert captions.clean_text('a\t"b"\nc') == "a b c"
    assert captions.drawing_captions("A crow", [], ["birds"], kind="picture")[1] == "a picture of a crow"
    assert captions.words_from_name("aiga_waiting_room1") == "aiga waiting room"


def test_openclipart_metadata_and_boilerplate(tmp_path: Path) -> None:
    root = make_openclipart(tmp_path / "oc")
    drawings, stats = clipart.scan_openclipart(root)
    by_name = {d.png.stem: d for d in drawings}
    cat = by_name["cat_someone_01"]
    assert cat.title == "Cute cat" and cat.keywords == ["cat", "animal"]
    assert cat.folder_words == ["animals", "mammals", "housecats"]
    icon = by_name["edit_copy"]
    assert icon.title_from_filename and icon.title == "edit copy" and icon.folder_words == ["computer"]
    assert stats["boilerplate_title"] == 1


def test_tuxpaint_scan_skips_mirrors(tmp_path: Path) -> None:
    stamps, stats = tuxpaint.scan_stamps(make_tuxpaint(tmp_path / "tp"))
    assert [s.path.name for s in stamps] == ["crow.png", "owl.svg"]
    assert stamps[0].description == "A crow" and stamps[0].folder_words == ["animals", "birds"]
    assert stats["mirror_or_back"] == 1


def test_heldout_identities_are_seeded_and_disjoint() -> None:
    members = {"a": [f"A{i}" for i in range(10)], "b": [f"B{i}" for i in range(31)]}
    split = splits.heldout_identities(members, seed=0)
    assert split == splits.heldout_identities(members, seed=0)
    assert len(split["a"]["test"]) == 5 and len(split["b"]["test"]) == 16
    for parts in split.values():
        assert not set(parts["train"]) & set(parts["test"])


def test_caption_csv_reads_as_open_clip_expects(tmp_path: Path) -> None:
    pairs = [Pair(tmp_path / f"img{i}.png", [f"cap {i}", f"a drawing of\tthing {i}"], "x") for i in range(50)]
    train, val = split_pairs(pairs, 0.2, seed=0)
    assert len(train) + len(val) == 50 and val
    n = write_caption_csv(tmp_path / "train.csv", train)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    assert lines[0] == "filepath\ttitle" and len(lines) == n + 1 == 2 * len(train) + 1
    assert all(line.count("\t") == 1 for line in lines)


def test_prepare_end_to_end_on_fixtures(tmp_path: Path) -> None:
    from training.prepare import prepare

    cache = tmp_path / "cache"
    make_npm_tree(cache / "npm")
    summary = prepare(cache, size=16, install=False, workers=1, min_per_class=2, min_test=1, n_tags=3,
                      openclipart_dir=make_openclipart(tmp_path / "oc"),
                      tuxpaint_dir=make_tuxpaint(tmp_path / "tp"), val_fraction=0.0)
    assert summary["tasks"]["classes"] == 2 and summary["tasks"]["images"] == 5 * 8
    assert (cache / "tasks/images/noto/face-smiling/263A.png").is_file()
    assert Image.open(cache / "tasks/images/fluent_mono/animal-mammal/1F415.png").size == (16, 16)
    classes = json.loads((cache / "tasks/classes.json").read_text())
    assert [c["name"] for c in classes["classes"]] == ["animal mammal", "smiling face"]
    held = json.loads((cache / "tasks/heldout_emoji.json").read_text())["classes"]
    test_ids = {h for parts in held.values() for h in parts["test"]}
    rows = [json.loads(x) for x in (cache / "fusion/test.jsonl").read_text().splitlines()]
    assert rows and {r["hexcode"] for r in rows} == test_ids and {"image", "text", "label"} <= set(rows[0])
    tag_rows = [json.loads(x) for x in (cache / "fusion/tags_train.jsonl").read_text().splitlines()]
    assert tag_rows and all(isinstance(r["label"], list) and r["label"] for r in tag_rows)
    csv = (cache / "pretrain/train.csv").read_text()
    assert "/openmoji/" in csv and "/fluent/" in csv and "Cute cat" in csv and "a picture of a crow" in csv
    for style in emoji.TASK_STYLES:
        assert f"/{style}/" not in csv
    # the continued-pretraining captions: every train row, plus the bare class words of each emoji picture
    plain = csv.splitlines()
    with_words = (cache / "pretrain/train_classwords.csv").read_text().splitlines()
    assert set(plain) <= set(with_words)
    added = set(with_words) - set(plain)
    openmoji_dog = next(line.split("\t")[0] for line in plain if "/openmoji/" in line and "1F415" in line)
    assert {f"{openmoji_dog}\tanimal mammal", f"{openmoji_dog}\tan animal mammal"} <= added
    assert all("/emoji/" in line.split("\t")[0] for line in added)
    assert len(with_words) - len(plain) == 2 * len({line.split("\t")[0] for line in plain if "/emoji/" in line})
    sets = summary["pretrain"]["caption_sets"]
    assert sets["train.csv"]["pairs"] == len(plain) - 1 and sets["train_classwords.csv"]["pairs"] == len(with_words) - 1
    # folder class words: the cat sits in animals/mammals (a task class); the crow's animal-bird is not one here
    with_folders = (cache / "pretrain/train_classwords_folders.csv").read_text().splitlines()
    cat = next(line.split("\t")[0] for line in plain if "Cute cat" in line)
    assert set(with_folders) - set(with_words) == {f"{cat}\tanimal mammal", f"{cat}\tan animal mammal"}
    assert set(with_words) <= set(with_folders)
    assert sets["train_classwords_folders.csv"]["pairs"] == len(with_folders) - 1
    assert summary["pretrain"]["folder_class_words"] == {"pictures": 1, "by_subgroup": {"animal-mammal": 1}}
    # monochrome versions of each Fluent colour emoji, captioned with its class words only; never of OpenMoji
    with_mono = (cache / "pretrain/train_classwords_mono.csv").read_text().splitlines()
    fluent = sorted({line.split("\t")[0] for line in plain if "/emoji/16px/fluent/" in line})
    mono_rows = set(with_mono) - set(with_words)
    # the fixture's silhouettes are the same file as its fluent_mono task drawings: left out as task copies
    dropped = summary["pretrain"]["dropped_task_copies"]
    assert dropped == [f"emoji/16px-mono/fluent-silhouette/{Path(p).name}" for p in fluent]
    task_bytes = {sha256_file(p) for p in (cache / "tasks").rglob("*.png")}
    assert all(sha256_file(cache / d) in task_bytes for d in dropped)
    for name in ("train.csv", "val.csv", "train_classwords.csv", "train_classwords_folders.csv",
                 "train_classwords_mono.csv"):  # no pretraining picture has a task picture's bytes
        rows = (cache / "pretrain" / name).read_text().splitlines()[1:]
        assert not {sha256_file(line.split("\t")[0]) for line in rows} & task_bytes, name
    assert set(with_words) <= set(with_mono) and len(mono_rows) == 2 * len(fluent) > 0
    fluent_dog = next(path for path in fluent if "1F415" in path)
    mono_dog = str(cache / "emoji/16px-mono/fluent-line/1F415.png")
    assert {f"{mono_dog}\tanimal mammal", f"{mono_dog}\tan animal mammal"} <= mono_rows
    assert Image.open(mono_dog).size == Image.open(fluent_dog).size
    assert all("/16px-mono/fluent-line/" in line.split("\t")[0] for line in mono_rows)
    assert sets["train_classwords_mono.csv"]["pairs"] == len(with_mono) - 1
    assert summary["pretrain"]["monochrome_pictures"] == len(fluent)
    by_source = summary["pretrain"]["images_by_source"]
    assert by_source["openclipart"] == 2 and by_source["tuxpaint"] == 2 and by_source["emoji_openmoji"] == 9
    assert (cache / "sheets/noto.png").is_file() and (cache / "prepare_summary.json").is_file()
    again = prepare(cache, size=16, install=False, workers=1, min_per_class=2, min_test=1, n_tags=3, sheets=False,
                    openclipart_dir=tmp_path / "oc", tuxpaint_dir=tmp_path / "tp", val_fraction=0.0)
    assert again["pretrain"] == summary["pretrain"]


def test_pictures_with_a_task_picture_s_bytes_are_dropped(tmp_path: Path) -> None:
    from training.prepare.pipeline import drop_task_copies, task_picture_hashes

    tasks = tmp_path / "tasks" / "openmoji_line" / "geometric"
    tasks.mkdir(parents=True)
    circle, cyclone = Image.new("L", (8, 8), 255), Image.new("L", (8, 8), 0)
    circle.save(tasks / "26AA.png")
    pre = tmp_path / "emoji" / "openmoji"
    pre.mkdir(parents=True)
    circle.save(pre / "26AA.png")  # a colourless emoji: its colour drawing is the line-art file
    cyclone.save(pre / "1F300.png")
    pairs = [Pair(pre / "26AA.png", ["white circle"], "emoji_openmoji"),
             Pair(pre / "26AA.png", ["geometric"], "emoji_openmoji"),
             Pair(pre / "1F300.png", ["cyclone"], "emoji_openmoji")]
    kept, dropped = drop_task_copies(pairs, task_picture_hashes(tmp_path / "tasks"))
    assert kept == pairs[2:] and dropped == [pre / "26AA.png"]


def test_monochrome_transforms_draw_black_on_white() -> None:
    from training.prepare.monochrome import line_art, silhouette

    picture = Image.new("RGB", (32, 32), "white")
    picture.paste((200, 60, 60), (8, 8, 24, 24))  # a red square on white
    lines = np.asarray(line_art(picture).convert("L"))
    assert set(np.unique(lines)) == {0, 255}
    assert lines[16, 16] == 255 and lines[16, 2] == 255  # inside and outside the square: white
    assert (lines[6:10, 16] == 0).any() and (lines[16, 22:26] == 0).any()  # its outline: black
    assert (lines[0] == 255).all() and (lines[:, -1] == 255).all()  # the picture's frame is no edge
    shape = np.asarray(silhouette(picture).convert("L"))
    assert shape[16, 16] == 0 and shape[2, 2] == 255 and (shape[8:24, 8:24] == 0).mean() > 0.9


def test_pretrain_argv_has_the_trainer_flags(tmp_path: Path) -> None:
    from training.pretrain import PretrainConfig

    argv = PretrainConfig(cache_dir=tmp_path, epochs=3, resume="latest").trainer_argv()
    joined = " ".join(argv)
    for flag in ("--model mmserve-vit-p12-96", "--dataset-type csv", "--csv-img-key filepath",
                 "--csv-caption-key title", "--batch-size 128", "--precision fp32", "--device cpu",
                 "--save-frequency 1", "--resume latest", "--epochs 3"):
        assert flag in joined
    assert argv[argv.index("--csv-separator") + 1] == "\t"


def test_export_weights_roundtrip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import open_clip

    from training.pretrain import export_weights, register_model_configs

    register_model_configs()
    model = open_clip.create_model("mmserve-tiny")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 2, "name": "t", "state_dict": state, "optimizer": {}}, tmp_path / "epoch_2.pt")
    info = export_weights(tmp_path / "epoch_2.pt", tmp_path / "out.safetensors", model="mmserve-tiny")
    assert info["verified"] and info["epoch"] == "2"
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "out.safetensors"))
    assert weights["logit_scale"].dtype == torch.float16 and not any(k.startswith("module.") for k in weights)


def test_re_export_keeps_the_existing_file_unless_the_weights_changed(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import open_clip

    from training.pretrain import export_weights, register_model_configs, same_safetensors

    register_model_configs()
    state = {f"module.{k}": v for k, v in open_clip.create_model("mmserve-tiny").state_dict().items()}
    torch.save({"epoch": 2, "state_dict": state}, tmp_path / "epoch_2.pt")
    out = tmp_path / "out.safetensors"
    export_weights(tmp_path / "epoch_2.pt", out, model="mmserve-tiny", verify=False)
    first = out.read_bytes()
    # the same weights with the header's metadata keys in another order: an equal file, left in place
    n = int.from_bytes(first[:8], "little")
    header = json.loads(first[8:8 + n])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    out.write_bytes(first[:8] + text + first[8 + n:])
    reordered = out.read_bytes()
    (tmp_path / "first.safetensors").write_bytes(first)
    assert reordered != first and same_safetensors(out, tmp_path / "first.safetensors")
    export_weights(tmp_path / "epoch_2.pt", out, model="mmserve-tiny", verify=False)
    assert out.read_bytes() == reordered  # not rewritten
    state["module.logit_scale"] = state["module.logit_scale"] + 1.0
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "epoch_3.pt")
    export_weights(tmp_path / "epoch_3.pt", out, model="mmserve-tiny", verify=False)
    assert out.read_bytes() != reordered and not list(tmp_path.glob(".*.tmp"))


def test_render_cache_stamps_clear_a_folder_made_from_something_else(tmp_path: Path) -> None:
    from training.prepare.stamps import STAMP, refresh_folder

    folder = tmp_path / "noto"
    folder.mkdir()
    Image.new("RGB", (4, 4)).save(folder / "263A.png")
    assert not refresh_folder(folder, {"version": "1"}, log=lambda m: None)  # no stamp yet: adopted as it is
    assert (folder / "263A.png").is_file() and json.loads((folder / STAMP).read_text()) == {"version": "1"}
    assert not refresh_folder(folder, {"version": "1"}, log=lambda m: None)  # same source: kept
    assert (folder / "263A.png").is_file()
    assert refresh_folder(folder, {"version": "2"}, log=lambda m: None)  # another source: its renders go
    assert not list(folder.glob("*.png")) and json.loads((folder / STAMP).read_text()) == {"version": "2"}
    Image.new("RGB", (4, 4)).save(folder / "263A.png")
    (folder / STAMP).write_text("{broken")
    assert refresh_folder(folder, {"version": "2"}, log=lambda m: None) and not list(folder.glob("*.png"))


def test_prepare_renders_a_style_again_when_its_package_changes(tmp_path: Path) -> None:
    from training.prepare import prepare

    cache = tmp_path / "cache"
    make_npm_tree(cache / "npm")
    options = dict(size=16, install=False, workers=1, min_per_class=2, min_test=1, n_tags=3, sheets=False,
                   openclipart_dir=make_openclipart(tmp_path / "oc"), tuxpaint_dir=make_tuxpaint(tmp_path / "tp"),
                   val_fraction=0.0)
    prepare(cache, **options)
    renders = cache / "emoji" / "16px"
    before = {p: p.stat().st_mtime_ns for p in renders.rglob("*.png")}
    (cache / "npm/node_modules/@iconify-json/noto/package.json").write_text('{"version": "9.9.9"}')
    prepare(cache, **options)
    after = {p: p.stat().st_mtime_ns for p in renders.rglob("*.png")}
    assert set(after) == set(before)
    redrawn = {p.parent.name for p in after if after[p] != before[p]}
    assert redrawn == {"noto"}  # only the style whose package changed was rendered again
    task_noto = next((cache / "tasks/images/noto").rglob("*.png"))
    assert task_noto.samefile(renders / "noto" / task_noto.name)  # the task tree follows the new render
