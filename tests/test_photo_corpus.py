"""The Debian-package photo corpus (``training/prepare_photos.py``); its use as training data is
tested in ``test_training_data_cache.py``.

A fake ``dpkg -x`` tree in ``tmp_path`` holds tiny synthetic JPEGs at every path of the real table, DEP-5
copyright files and plasma ``metadata.json`` files; nothing calls apt-get or dpkg.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from sr_diffusion.resize import imresize
from sr_diffusion.training import photo_corpus as pc

REPO = Path(__file__).resolve().parents[1]


def _load_cli():
    spec = importlib.util.spec_from_file_location("prepare_photos", REPO / "training" / "prepare_photos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_jpeg(path: Path, height: int, width: int, seed: int) -> None:
    """A smooth random colour field (JPEG-friendly) of the given size."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(3, 4, 3))
    img = PIL.Image.fromarray(coarse.astype(np.uint8)).resize((width, height), PIL.Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90)


def _lomiri_author(stem: str) -> str:
    return stem.split("_by_")[1].replace("_", " ")


def _make_tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every photo of :data:`PHOTOS` as a tiny JPEG (odd sizes included) plus the credit files; returns
    stem → (height, width)."""
    sizes = {}
    for i, photo in enumerate(pc.PHOTOS):
        height, width = 17 + 2 * (i % 3), 24 + (i % 2)  # 17/19/21 x 24/25: odd and even
        _write_jpeg(root / photo.package / photo.path, height, width, seed=i)
        sizes[photo.stem] = (height, width)
    for series in ("16.04", "20.04"):
        package = f"lomiri-wallpapers-{series}"
        stanzas = ["Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"]
        stanzas.append("Files: *\nCopyright: 2018 Nobody\nLicense: WRONG\n")  # earlier stanza, overridden below
        for photo in pc.PHOTOS:
            if photo.package == package:
                name = Path(photo.path).name
                stanzas.append(
                    f"Files: {series}/{name}\nCopyright: {_lomiri_author(photo.stem)}, 2018\nLicense: CC-BY-4.0\n"
                )
        stanzas.append("License: CC-BY-4.0\n Attribution 4.0 International\n .\n more text\n")
        doc = root / package / "usr" / "share" / "doc" / package
        doc.mkdir(parents=True, exist_ok=True)
        (doc / "copyright").write_text("\n".join(stanzas))
        with gzip.open(doc / "changelog.Debian.gz", "wt") as f:
            f.write("lomiri-wallpapers (20.04.0-2) unstable; urgency=medium\n\n  * Test.\n")
    plasma = root / "plasma-workspace-wallpapers"
    doc = plasma / "usr" / "share" / "doc" / "plasma-workspace-wallpapers"
    doc.mkdir(parents=True, exist_ok=True)
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: 2014 KDE Visual Design Group\nLicense: GPL-2+\n\n"
        "Files: debian/*\nCopyright: 2014, Someone\nLicense: GPL-2+\n"
    )
    (plasma / "DEBIAN").mkdir()
    (plasma / "DEBIAN" / "control").write_text("Package: plasma-workspace-wallpapers\nVersion: 4:5.27.5-2\n")
    for photo in pc.PHOTOS:
        if photo.package == "plasma-workspace-wallpapers":
            name = photo.stem.removeprefix("plasma_")
            metadata = {"KPlugin": {"Authors": [{"Name": f"Author of {name}", "Name[de]": "x"}], "License": "LGPLv3"}}
            (plasma / "usr" / "share" / "wallpapers" / name / "metadata.json").write_text(json.dumps(metadata))
    (root / "ukui-wallpapers" / "usr").mkdir(parents=True)
    return sizes


@pytest.fixture
def fake_tree(tmp_path):
    root = tmp_path / "x"
    return root, _make_tree(root)


# ----------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------


def test_real_table_splits_and_sources():
    train = [p.stem for p in pc.PHOTOS if p.split == "train"]
    val = [p.stem for p in pc.PHOTOS if p.split == "val"]
    assert (len(train), len(val)) == (19, 7)
    assert len(val) >= 6
    assert not set(train) & set(val)
    assert len(set(train + val)) == len(pc.PHOTOS)
    assert {p.package for p in pc.PHOTOS} <= set(pc.PACKAGES)
    assert "ukui-wallpapers" in pc.PACKAGES and all(p.package != "ukui-wallpapers" for p in pc.PHOTOS)
    for p in pc.PHOTOS:
        if p.package == "plasma-workspace-wallpapers":
            assert p.stem.startswith("plasma_") and p.path.endswith("/contents/images/2560x1600.jpg")
        else:
            assert p.path == f"usr/share/backgrounds/{p.stem}.jpg"


def test_parse_dep5_and_last_matching_stanza_wins():
    text = (
        "Format: x\n\nFiles: *\nCopyright: A\nLicense: GPL-2+\n\n"
        "Files: 16.04/a.jpg\n 16.04/b.jpg\nCopyright: 2018. Sander Klootwijk\nLicense: CC-BY-SA-4.0\n\n"
        "License: CC-BY-SA-4.0\n Text\n .\n More\n"
    )
    stanzas = pc.parse_dep5(text)
    assert len(stanzas) == 4
    assert stanzas[2]["Files"].split() == ["16.04/a.jpg", "16.04/b.jpg"]
    assert stanzas[3]["License"] == "CC-BY-SA-4.0\nText\n\nMore"
    assert pc.dep5_stanza(stanzas, "16.04/b.jpg")["Copyright"] == "2018. Sander Klootwijk"
    assert pc.dep5_stanza(stanzas, "20.04/c.jpg")["Copyright"] == "A"  # "*" matches "/" too
    assert pc.dep5_stanza(stanzas[2:], "20.04/c.jpg") is None
    assert pc._author_from_notice("2018. Sander Klootwijk") == "Sander Klootwijk"
    assert pc._author_from_notice('"Bolly", 2018') == "Bolly"
    assert pc._author_from_notice('Trevor "Freespace", 2018') == 'Trevor "Freespace"'
    assert pc._author_from_notice("2021, Lukas Baubkus") == "Lukas Baubkus"


# ----------------------------------------------------------------------------------------------------------
# building the corpus
# ----------------------------------------------------------------------------------------------------------


def test_cli_builds_half_size_photos_split_and_credited(fake_tree, tmp_path, capsys):
    root, sizes = fake_tree
    out = tmp_path / "corpus"
    assert _load_cli().main(["--extracted", str(root), "--out", str(out)]) == 0
    assert "26 photos (19 train, 7 val), 26 built" in capsys.readouterr().out

    for split in ("train", "val"):
        expected = {p.stem for p in pc.PHOTOS if p.split == split}
        assert {f.stem for f in (out / split).glob("*.png")} == expected
    for photo in pc.PHOTOS:
        source = np.asarray(PIL.Image.open(root / photo.package / photo.path).convert("RGB"))
        height, width = sizes[photo.stem]
        result = np.asarray(PIL.Image.open(out / photo.split / f"{photo.stem}.png"))
        assert result.shape == (height // 2, width // 2, 3) and result.dtype == np.uint8
        even = source[: height - height % 2, : width - width % 2].astype(np.float64) / 255.0
        reference = np.round(np.clip(imresize(even, scale=0.5), 0, 1) * 255).astype(np.uint8)
        np.testing.assert_array_equal(result, reference)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == pc.RECIPE and set(manifest["photos"]) == {p.stem for p in pc.PHOTOS}
    entry = manifest["photos"]["plasma_Kite"]
    assert entry["version"] == "4:5.27.5-2" and entry["split"] == "train"  # from DEBIAN/control
    assert manifest["photos"]["Kleiber_by_Lukas_Baubkus"]["version"] == "20.04.0-2"  # from changelog.Debian.gz
    assert entry["output_sha256"] == pc._sha256(out / "train" / "plasma_Kite.png")
    assert entry["source_sha256"] == pc._sha256(root / "plasma-workspace-wallpapers" / entry["path"])

    credits = (out / "CREDITS.md").read_text()
    rows = [line for line in credits.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(pc.PHOTOS)
    assert (
        "| Kleiber_by_Lukas_Baubkus | val | Lukas Baubkus | CC-BY-4.0 | Lukas Baubkus, 2018 "
        "| lomiri-wallpapers-20.04 (20.04.0-2) | `usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg` |" in rows
    )
    assert any(
        row.startswith("| plasma_Kite | train | Author of Kite | LGPLv3 (metadata.json); GPL-2+ (debian/copyright) |")
        for row in rows
    )
    assert "WRONG" not in credits  # the specific stanza beats the earlier "Files: *"


def test_rerun_skips_and_changed_source_is_rebuilt(fake_tree, tmp_path):
    root, _ = fake_tree
    out = tmp_path / "corpus"
    roots = pc.find_extracted(root)
    table = [pc.PHOTOS[i] for i in (0, 1, 3, 14, 15)]  # three packages, both splits
    assert all(p.built for p in pc.build_corpus(roots, out, table))
    mtimes = {f: f.stat().st_mtime_ns for f in out.rglob("*.png")}
    assert len(mtimes) == len(table)

    again = pc.build_corpus(roots, out, table)
    assert not any(p.built for p in again)
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*.png")} == mtimes

    changed = table[2]
    before = (out / changed.split / f"{changed.stem}.png").read_bytes()
    _write_jpeg(root / changed.package / changed.path, 22, 30, seed=99)
    third = pc.build_corpus(roots, out, table)
    assert [p.stem for p in third if p.built] == [changed.stem]
    assert (out / changed.split / f"{changed.stem}.png").read_bytes() != before
    assert third[2].size == (11, 15)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["photos"][changed.stem]["source_sha256"] == pc._sha256(root / changed.package / changed.path)

    # A damaged output is rebuilt; a photo moved to the other split leaves no stale copy behind.
    (out / table[0].split / f"{table[0].stem}.png").write_bytes(b"not a png")
    moved = [pc.CorpusPhoto(p.package, p.path, p.stem, "val" if i == 1 else p.split) for i, p in enumerate(table)]
    fourth = pc.build_corpus(roots, out, moved)
    assert [p.stem for p in fourth if p.built] == [table[0].stem, table[1].stem]
    assert (out / "val" / f"{table[1].stem}.png").is_file()
    assert not (out / "train" / f"{table[1].stem}.png").exists()


def test_missing_photo_package_or_credit_is_a_clear_error(fake_tree, tmp_path, capsys):
    root, _ = fake_tree
    out = tmp_path / "corpus"
    photo = pc.PHOTOS[5]
    (root / photo.package / photo.path).unlink()
    with pytest.raises(pc.PhotoCorpusError, match=rf"package {photo.package}: photo {photo.path} not found"):
        pc.build_corpus(pc.find_extracted(root), out)
    assert not out.exists()  # nothing is processed before every source is found
    assert _load_cli().main(["--extracted", str(root), "--out", str(out)]) == 1
    assert f"error: package {photo.package}: photo {photo.path} not found" in capsys.readouterr().err

    _write_jpeg(root / photo.package / photo.path, 18, 24, seed=5)
    metadata = root / "plasma-workspace-wallpapers" / "usr" / "share" / "wallpapers" / "Grey" / "metadata.json"
    metadata.write_text(json.dumps({"KPlugin": {"Authors": []}}))
    with pytest.raises(pc.PhotoCorpusError, match=r"plasma-workspace-wallpapers, .*Grey.*: no credit"):
        pc.build_corpus(pc.find_extracted(root), out)
    metadata.unlink()
    with pytest.raises(pc.PhotoCorpusError, match=r"Grey.*no credit \(no .*metadata.json\)"):
        pc.build_corpus(pc.find_extracted(root), out)

    copyright_file = (
        root / "lomiri-wallpapers-20.04" / "usr" / "share" / "doc" / "lomiri-wallpapers-20.04" / "copyright"
    )
    copyright_file.write_text("Format: x\n\nFiles: 20.04/Other.jpg\nCopyright: X\nLicense: Y\n")
    with pytest.raises(pc.PhotoCorpusError, match=r"no credit \(no 'Files: 20.04/Kleiber_by_Lukas_Baubkus.jpg'"):
        pc.photo_credit(pc.PHOTOS[14], root / "lomiri-wallpapers-20.04")

    import shutil

    shutil.rmtree(root / "lomiri-wallpapers-16.04")
    with pytest.raises(pc.PhotoCorpusError, match=r"package lomiri-wallpapers-16.04: no extracted tree"):
        pc.find_extracted(root)


def test_fetch_packages_runs_apt_get_and_dpkg_through_the_runner(tmp_path):
    calls = []

    def runner(argv, check, cwd=None):
        calls.append(list(argv))
        if argv[:2] == ["apt-get", "download"]:
            (Path(cwd) / f"{argv[2]}_1.0-1_all.deb").write_bytes(b"deb")
        elif argv[:2] == ["dpkg", "-x"]:
            (Path(argv[3]) / "usr" / "share").mkdir(parents=True)
        elif argv[:2] == ["dpkg", "-e"]:
            Path(argv[3]).mkdir(parents=True)
            (Path(argv[3]) / "control").write_text(f"Package: {Path(argv[2]).name.split('_')[0]}\nVersion: 1.0-1\n")
        return subprocess.CompletedProcess(argv, 0)

    cache = tmp_path / "cache"
    roots = pc.fetch_packages(cache, runner=runner)
    needed = sorted({p.package for p in pc.PHOTOS})
    assert needed == ["lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04", "plasma-workspace-wallpapers"]
    assert [c for c in calls if c[0] == "apt-get"] == [["apt-get", "download", n] for n in needed]
    assert sorted(roots) == needed
    for name, root in roots.items():
        assert root == cache / "x" / name and (root / "usr" / "share").is_dir()
        assert pc.package_version(root, name) == "1.0-1"
    calls.clear()
    pc.fetch_packages(cache, runner=runner)  # downloaded and extracted already: nothing runs
    assert calls == []

    (cache / "plasma-workspace-wallpapers_2.0-1_all.deb").write_bytes(b"deb")
    with pytest.raises(pc.PhotoCorpusError, match="package plasma-workspace-wallpapers: several .deb files"):
        pc.extract_debs(cache, tmp_path / "y", runner=runner)
    with pytest.raises(pc.PhotoCorpusError, match=r"package ukui-wallpapers: no ukui-wallpapers_\*.deb"):
        pc.extract_debs(cache, tmp_path / "y", ["ukui-wallpapers"], runner=runner)
    with pytest.raises(pc.PhotoCorpusError, match="'gnome-backgrounds' is not an allowed source"):
        pc.build_corpus({}, tmp_path / "z", [pc.CorpusPhoto("gnome-backgrounds", "a.jpg", "a", "train")])
