"""A reproducible corpus of real photos for SR training, built from four Debian wallpaper packages.

The photos (artwork excluded, chosen by looking at every image) are listed in :data:`PHOTOS`, one row per
file: package, path inside the package (``dpkg -x`` layout), output stem and split. 19 are for training,
7 are held out for validation and never trained on. Each photo is prepared the DIV2K way:

1. decoded to RGB uint8 (EXIF orientation applied), mod-cropped to even height and width (bottom/right);
2. converted to float64 in [0, 1] and downscaled x2 by MATLAB's antialiased bicubic
   (:func:`sr_diffusion.resize.imresize` with ``scale=0.5``), which removes JPEG blocking and sensor noise;
3. clamped to [0, 1], rounded to uint8 and written to ``<out>/<split>/<stem>.png``, so an ``H x W``
   photo gives ``floor(H/2) x floor(W/2)``.

Every write is atomic. ``<out>/manifest.json`` records, per photo, the source's sha256, its package name
and version and the output's sha256; a re-run skips a photo whose source hash, recipe and output are
unchanged and rebuilds it otherwise. ``<out>/CREDITS.md`` names every photo's author and licence, parsed
from the packages themselves: lomiri's DEP-5 ``debian/copyright`` (``Files: 16.04/<name>.jpg``: the
upstream path, not the installed one), plasma's per-wallpaper ``metadata.json`` (``KPlugin.Authors[0].Name``,
``KPlugin.License``) plus the package's ``Files: *`` licence.

Packages come from ``apt-get download`` + ``dpkg -x`` into a cache (:func:`fetch_packages`; the command
runner is injectable), from already downloaded ``.deb`` files (:func:`extract_debs`), or from already
extracted trees ``<dir>/<package>/usr/...`` (:func:`find_extracted`). ``training/prepare_photos.py`` is
the command line; training configs then use ``data.source: folder`` with ``data.hr_dirs: [<out>/train]``.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sr_diffusion.utils import atomic_directory, atomic_path

__all__ = [
    "PACKAGES",
    "PHOTOS",
    "RECIPE",
    "PhotoCorpusError",
    "CorpusPhoto",
    "PhotoCredit",
    "PreparedPhoto",
    "default_corpus_dir",
    "fetch_packages",
    "extract_debs",
    "find_extracted",
    "package_version",
    "parse_dep5",
    "dep5_stanza",
    "photo_credit",
    "prepare_photo",
    "build_corpus",
    "write_credits",
]


class PhotoCorpusError(RuntimeError):
    """A package, photo or credit is missing or unusable; the message names the package and path."""


# ----------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------

#: The only packages the corpus may be built from. ``ukui-wallpapers`` is an allowed source, but all of
#: its images are artwork (renders, illustrations, logos), so no row of :data:`PHOTOS` uses it and it is
#: never fetched.
PACKAGES = ("lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04", "plasma-workspace-wallpapers", "ukui-wallpapers")


@dataclass(frozen=True)
class CorpusPhoto:
    """One photo of the corpus: ``path`` inside ``package`` (``dpkg -x`` layout), written as
    ``<out>/<split>/<stem>.png``."""

    package: str
    path: str
    stem: str
    split: Literal["train", "val"]


def _lomiri(package: str, name: str, split: Literal["train", "val"]) -> CorpusPhoto:
    return CorpusPhoto(package, f"usr/share/backgrounds/{name}.jpg", name, split)


def _plasma(name: str, image: str, split: Literal["train", "val"]) -> CorpusPhoto:
    # ``image`` is the largest regular file in contents/images/ (every other size there is a symlink to it).
    return CorpusPhoto(
        "plasma-workspace-wallpapers", f"usr/share/wallpapers/{name}/contents/images/{image}", f"plasma_{name}", split
    )


_L16, _L20 = "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04"

#: The corpus: 19 training photos and 7 held-out validation photos.
PHOTOS: tuple[CorpusPhoto, ...] = (
    _lomiri(_L16, "Bridge_by_Sander_Klootwijk", "train"),
    _lomiri(_L16, "Dragonfly_by_Bolly", "train"),
    _lomiri(_L16, "Picture_0B_by_freespace", "train"),
    _lomiri(_L16, "Picture_1A_by_freespace", "train"),
    _lomiri(_L16, "Wine_by_Jakkub_Mede", "train"),
    _lomiri(_L16, "aitzgorri_by_Aitzol_Berasategi", "train"),
    _lomiri(_L16, "analogpattern_by_Peter_Nerlich", "train"),
    _lomiri(_L16, "free_by_Peter_Nerlich", "train"),
    _lomiri(_L16, "friends_by_Aitzol_Berasategi", "train"),
    _lomiri(_L16, "greentock_by_Peter_Nerlich", "train"),
    _lomiri(_L16, "sunset_by_Aitzol_Berasategi", "train"),
    _lomiri(_L16, "life_by_Aitzol_Berasategi", "val"),
    _lomiri(_L16, "picosdeeuropa_by_Aitzol_Berasategi", "val"),
    _lomiri(_L16, "seeding_by_Clements_Engelhardt", "val"),
    _lomiri(_L20, "Kleiber_by_Lukas_Baubkus", "val"),
    _plasma("BytheWater", "2560x1600.jpg", "train"),
    _plasma("ColdRipple", "2560x1600.jpg", "train"),
    _plasma("DarkestHour", "2560x1600.jpg", "train"),
    _plasma("Grey", "2560x1600.jpg", "train"),
    _plasma("Kite", "2560x1600.jpg", "train"),
    _plasma("OneStandsOut", "2560x1600.jpg", "train"),
    _plasma("Path", "2560x1600.jpg", "train"),
    _plasma("summer_1am", "2560x1600.jpg", "train"),
    _plasma("EveningGlow", "2560x1600.jpg", "val"),
    _plasma("ColorfulCups", "2560x1600.jpg", "val"),
    _plasma("FallenLeaf", "2560x1600.jpg", "val"),
)

#: Names the preparation; a change of it rebuilds every output.
RECIPE = "modcrop2+matlab_bicubic_x0.5_float64+round_uint8_png/v1"


def default_corpus_dir() -> Path:
    """``data/photos`` under the repository root (git-ignored; the prepared corpus is not committed)."""
    return Path(__file__).resolve().parents[2] / "data" / "photos"


# ----------------------------------------------------------------------------------------------------------
# packages: fetch, extract, find
# ----------------------------------------------------------------------------------------------------------

Runner = Callable[..., object]  # subprocess.run-like: runner(argv, check=True, cwd=...)


def _needed_packages(photos: Iterable[CorpusPhoto]) -> list[str]:
    names = sorted({p.package for p in photos})
    for name in names:
        if name not in PACKAGES:
            raise PhotoCorpusError(f"package {name!r} is not an allowed source (allowed: {', '.join(PACKAGES)})")
    return names


def _extract(deb: Path, dest: Path, runner: Runner) -> None:
    """``dpkg -x`` ``deb`` into ``dest`` (and its control files into ``dest/DEBIAN``), atomically; skipped
    when ``dest`` was extracted from the same file name already."""
    stamp = dest / "DEBIAN" / ".extracted-from"
    if stamp.is_file() and stamp.read_text().strip() == deb.name:
        return
    with atomic_directory(dest) as tmp:
        runner(["dpkg", "-x", str(deb), str(tmp)], check=True)
        runner(["dpkg", "-e", str(deb), str(tmp / "DEBIAN")], check=True)
        (tmp / "DEBIAN").mkdir(exist_ok=True)
        (tmp / "DEBIAN" / ".extracted-from").write_text(deb.name + "\n")


def _find_deb(debs_dir: Path, name: str) -> Path | None:
    found = sorted(debs_dir.glob(f"{name}_*.deb"))
    if len(found) > 1:
        raise PhotoCorpusError(
            f"package {name}: several .deb files in {debs_dir} ({', '.join(p.name for p in found)}); keep one"
        )
    return found[0] if found else None


def extract_debs(
    debs_dir: str | os.PathLike,
    dest_dir: str | os.PathLike,
    packages: Sequence[str] | None = None,
    *,
    runner: Runner = subprocess.run,
) -> dict[str, Path]:
    """Extract ``<debs_dir>/<name>_*.deb`` to ``<dest_dir>/<name>`` for each package; returns name → root."""
    debs_dir, dest_dir = Path(debs_dir), Path(dest_dir)
    packages = _needed_packages(PHOTOS) if packages is None else list(packages)
    roots = {}
    for name in packages:
        deb = _find_deb(debs_dir, name)
        if deb is None:
            raise PhotoCorpusError(f"package {name}: no {name}_*.deb in {debs_dir}")
        _extract(deb, dest_dir / name, runner)
        roots[name] = dest_dir / name
    return roots


def fetch_packages(
    cache_dir: str | os.PathLike, packages: Sequence[str] | None = None, *, runner: Runner = subprocess.run
) -> dict[str, Path]:
    """``apt-get download`` each package not yet in ``cache_dir``, then extract it to ``<cache_dir>/x/<name>``.

    ``runner`` runs the commands (``subprocess.run`` by default; tests pass a fake).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    packages = _needed_packages(PHOTOS) if packages is None else list(packages)
    for name in packages:
        if _find_deb(cache_dir, name) is None:
            try:
                runner(["apt-get", "download", name], check=True, cwd=str(cache_dir))
            except (OSError, subprocess.CalledProcessError) as err:
                raise PhotoCorpusError(f"package {name}: apt-get download failed ({err})") from err
    return extract_debs(cache_dir, cache_dir / "x", packages, runner=runner)


def find_extracted(extracted_dir: str | os.PathLike, packages: Sequence[str] | None = None) -> dict[str, Path]:
    """Already extracted trees ``<extracted_dir>/<name>/usr/...``; returns name → root."""
    extracted_dir = Path(extracted_dir)
    packages = _needed_packages(PHOTOS) if packages is None else list(packages)
    roots = {}
    for name in packages:
        root = extracted_dir / name
        if not (root / "usr").is_dir():
            raise PhotoCorpusError(f"package {name}: no extracted tree {root}/usr (expected `dpkg -x` layout)")
        roots[name] = root
    return roots


def package_version(root: str | os.PathLike, name: str) -> str | None:
    """The package's version from ``DEBIAN/control`` (trees extracted here), else from the first line of
    ``usr/share/doc/<name>/changelog.Debian.gz`` (the source upload's version, the same but for binNMUs);
    None when neither is there."""
    root = Path(root)
    control = root / "DEBIAN" / "control"
    if control.is_file():
        match = re.search(r"^Version:\s*(\S+)", control.read_text(encoding="utf-8"), re.M)
        if match:
            return match.group(1)
    changelog = root / "usr" / "share" / "doc" / name / "changelog.Debian.gz"
    if changelog.is_file():
        with gzip.open(changelog, "rt", encoding="utf-8") as f:
            # "<source package> (<version>) <distribution>; urgency=..." (the source name may differ)
            match = re.match(r"[a-z0-9][a-z0-9+.-]*\s+\(([^)]+)\)", f.readline())
        if match:
            return match.group(1)
    return None


# ----------------------------------------------------------------------------------------------------------
# credits
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoCredit:
    """Who made a photo and under which licence, as the package states it.

    ``notice`` is the verbatim ``Copyright:`` of the file's DEP-5 stanza in ``usr/share/doc/<pkg>/copyright``.
    """

    stem: str
    split: str
    author: str
    license: str
    notice: str
    package: str
    version: str | None
    path: str


def parse_dep5(text: str) -> list[dict[str, str]]:
    """Stanzas of a DEP-5 (machine-readable ``debian/copyright``) file as ``{field: value}``; continuation
    lines are joined with newlines (``" ."`` lines become empty lines)."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
        elif line[0] in " \t":
            if key is not None:
                value = line.strip()
                current[key] += "\n" + ("" if value == "." else value)
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def dep5_stanza(stanzas: Sequence[Mapping[str, str]], path: str) -> Mapping[str, str] | None:
    """The ``Files`` stanza that governs ``path`` (a path in the source tree): the last one with a matching
    pattern, as DEP-5 specifies (``*`` and ``?`` match ``/`` too)."""
    found = None
    for stanza in stanzas:
        patterns = stanza.get("Files", "").split()
        if any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns):
            found = stanza
    return found


def _author_from_notice(notice: str) -> str:
    """``"Aitzol Berasategi, 2018"``, ``"2018. Sander Klootwijk"``, ``'"Bolly", 2018'`` → the name."""
    first = notice.splitlines()[0]
    name = re.sub(r"\b\d{4}(\s*-\s*\d{4})?\b", "", first).strip(" ,.;")
    if name.startswith('"') and name.endswith('"') and name.count('"') == 2:
        name = name[1:-1]
    return name


def _read_copyright(root: Path, package: str) -> list[dict[str, str]]:
    path = root / "usr" / "share" / "doc" / package / "copyright"
    if not path.is_file():
        raise PhotoCorpusError(f"package {package}: no copyright file {path}")
    return parse_dep5(path.read_text(encoding="utf-8"))


def photo_credit(photo: CorpusPhoto, root: str | os.PathLike, version: str | None = None) -> PhotoCredit:
    """The credit of ``photo`` from its package tree ``root``; :class:`PhotoCorpusError` if there is none.

    lomiri-wallpapers-<series>: the DEP-5 stanza of ``<series>/<file name>`` (the upstream path) gives the
    notice, the author (the notice without its year) and the licence. plasma-workspace-wallpapers: the
    wallpaper's ``metadata.json`` gives the author (``KPlugin.Authors[0].Name``) and its licence
    (``KPlugin.License``), the package's DEP-5 stanza (``Files: *``) the notice and the package licence.
    """
    root = Path(root)
    stanzas = _read_copyright(root, photo.package)
    where = f"package {photo.package}, {photo.path}"
    if photo.package.startswith("lomiri-wallpapers-"):
        series = photo.package.removeprefix("lomiri-wallpapers-")
        upstream = f"{series}/{Path(photo.path).name}"
        stanza = dep5_stanza(stanzas, upstream)
        if stanza is None or not stanza.get("Copyright") or not stanza.get("License"):
            raise PhotoCorpusError(f"{where}: no credit (no 'Files: {upstream}' stanza with Copyright and License)")
        notice = stanza["Copyright"]
        author, license_ = _author_from_notice(notice), stanza["License"].splitlines()[0]
    elif photo.package == "plasma-workspace-wallpapers":
        parts = Path(photo.path).parts  # usr/share/wallpapers/<Name>/contents/images/<file>
        if parts[:3] != ("usr", "share", "wallpapers") or len(parts) < 5:
            raise PhotoCorpusError(f"{where}: not under usr/share/wallpapers/<Name>/")
        metadata_path = root.joinpath(*parts[:4], "metadata.json")
        if not metadata_path.is_file():
            raise PhotoCorpusError(f"{where}: no credit (no {metadata_path})")
        plugin = json.loads(metadata_path.read_text(encoding="utf-8")).get("KPlugin", {})
        authors = plugin.get("Authors") or [{}]
        author = authors[0].get("Name", "").strip()
        if not author:
            raise PhotoCorpusError(f"{where}: no credit (no KPlugin.Authors[0].Name in {metadata_path})")
        upstream = "/".join(parts[3:])  # the source tree holds <Name>/contents/images/<file>
        stanza = dep5_stanza(stanzas, upstream)
        if stanza is None or not stanza.get("License"):
            raise PhotoCorpusError(f"{where}: no licence in the package copyright file for {upstream}")
        notice = stanza.get("Copyright", "")
        package_license = stanza["License"].splitlines()[0]
        own = plugin.get("License", "").strip()
        license_ = (
            f"{own} (metadata.json); {package_license} (debian/copyright)"
            if own and own != package_license
            else package_license
        )
    else:
        raise PhotoCorpusError(f"{where}: no credit parser for package {photo.package}")
    return PhotoCredit(
        photo.stem, photo.split, author, license_, " ".join(notice.split()), photo.package, version, photo.path
    )


def write_credits(path: str | os.PathLike, credits: Sequence[PhotoCredit]) -> None:
    """Write ``CREDITS.md`` (a Markdown table, one row per photo) atomically."""

    def cell(text: str | None) -> str:
        return (text or "").replace("|", "\\|")

    lines = [
        "# Photo credits",
        "",
        "Every image here is a photo from a Debian package, downscaled x2 (MATLAB bicubic) by",
        "`training/prepare_photos.py`. Authors and licences are those stated by the packages",
        "(`usr/share/doc/<package>/copyright`; for plasma wallpapers also `metadata.json`).",
        "",
        "| Stem | Split | Author | Licence | Copyright notice | Package | Path |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in credits:
        package = c.package if c.version is None else f"{c.package} ({c.version})"
        lines.append(
            f"| {cell(c.stem)} | {c.split} | {cell(c.author)} | {cell(c.license)} | {cell(c.notice)} "
            f"| {cell(package)} | `{c.path}` |"
        )
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# preparation
# ----------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_photo(source: str | os.PathLike, output: str | os.PathLike) -> tuple[int, int]:
    """Decode ``source``, mod-crop to even size, downscale x2 (MATLAB bicubic, float64), round and write
    ``output`` (PNG) atomically; returns the output's ``(height, width)``.

    Shapes: (H, W, 3) uint8 → (H - H mod 2, W - W mod 2, 3) float64 in [0, 1] → (⌊H/2⌋, ⌊W/2⌋, 3) uint8.
    """
    import PIL.Image

    from sr_diffusion.image_processor import load_image
    from sr_diffusion.resize import imresize

    rgb = np.asarray(load_image(source).convert("RGB"))
    height, width = rgb.shape[0] - rgb.shape[0] % 2, rgb.shape[1] - rgb.shape[1] % 2
    x = rgb[:height, :width].astype(np.float64) / 255.0
    del rgb
    y = imresize(x, scale=0.5)
    del x
    out = np.round(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)
    with atomic_path(output) as tmp:
        PIL.Image.fromarray(out).save(tmp, format="PNG")
    return out.shape[0], out.shape[1]


@dataclass
class PreparedPhoto:
    """What :func:`build_corpus` did for one photo; ``built`` is False when the output was up to date."""

    stem: str
    split: str
    output: Path
    size: tuple[int, int]  # (height, width)
    built: bool
    seconds: float


def _load_manifest(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # unreadable: rebuild everything
    return manifest if isinstance(manifest, dict) and manifest.get("recipe") == RECIPE else {}


def _write_manifest(path: Path, photos: Mapping[str, dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"recipe": RECIPE, "photos": dict(photos)}, indent=2, sort_keys=True) + "\n")


def build_corpus(
    roots: Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    photos: Sequence[CorpusPhoto] = PHOTOS,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[PreparedPhoto]:
    """Prepare every photo of ``photos`` from the package trees ``roots`` (name → root) into ``out_dir``.

    Writes ``<out_dir>/{train,val}/<stem>.png``, ``manifest.json`` and ``CREDITS.md``. Every credit and
    every source file is checked before any image is processed, so a missing package, photo or credit
    fails at once (:class:`PhotoCorpusError`). A photo is rebuilt when ``force``, when it is not in the
    manifest, or when its source sha256, package, split or output differs from what the manifest records;
    an output the manifest listed under another name (a stem or split change) is removed.
    """
    out_dir = Path(out_dir)
    log = log or (lambda message: None)
    _needed_packages(photos)  # only the allowed packages
    stems = [p.stem for p in photos]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise PhotoCorpusError(f"duplicate stems in the photo table: {', '.join(duplicates)}")

    # 1. Check sources and credits first: a bad table or package fails before any work.
    versions, credits, sources = {}, [], {}
    for photo in photos:
        if photo.package not in roots:
            raise PhotoCorpusError(f"package {photo.package}: not available (needed for {photo.path})")
        root = Path(roots[photo.package])
        if photo.package not in versions:
            versions[photo.package] = package_version(root, photo.package)
        source = root / photo.path
        if not source.is_file():
            raise PhotoCorpusError(f"package {photo.package}: photo {photo.path} not found ({source})")
        sources[photo.stem] = source
        credits.append(photo_credit(photo, root, versions[photo.package]))

    # 2. Prepare each photo (one at a time: a 6000x3400 photo is ~0.5 GB in float64).
    manifest_path = out_dir / "manifest.json"
    previous = _load_manifest(manifest_path).get("photos", {})
    entries: dict[str, dict] = {}
    done = []
    for photo in photos:
        start = time.perf_counter()
        source, output = sources[photo.stem], out_dir / photo.split / f"{photo.stem}.png"
        relative = output.relative_to(out_dir).as_posix()
        source_hash = _sha256(source)
        old = previous.get(photo.stem, {})
        up_to_date = (
            not force
            and old.get("source_sha256") == source_hash
            and old.get("package") == photo.package
            and old.get("path") == photo.path
            and old.get("output") == relative
            and output.is_file()
            and _sha256(output) == old.get("output_sha256")
        )
        if up_to_date:
            entry = old
        else:
            size = prepare_photo(source, output)
            entry = {
                "package": photo.package,
                "version": versions[photo.package],
                "path": photo.path,
                "split": photo.split,
                "source_sha256": source_hash,
                "output": relative,
                "output_sha256": _sha256(output),
                "height": size[0],
                "width": size[1],
            }
        entry["version"] = versions[photo.package]
        entries[photo.stem] = entry
        _write_manifest(manifest_path, {**previous, **entries})
        seconds = time.perf_counter() - start
        done.append(
            PreparedPhoto(photo.stem, photo.split, output, (entry["height"], entry["width"]), not up_to_date, seconds)
        )
        log(
            f"{'built' if not up_to_date else 'up to date'}: {relative} "
            f"({entry['width']}x{entry['height']}, {seconds:.1f} s)"
        )

    # 3. Drop outputs of photos the table no longer lists under that name; final manifest and credits.
    current = {e["output"] for e in entries.values()}
    for old in previous.values():
        stale = old.get("output")
        if stale and stale not in current and (out_dir / stale).is_file():
            (out_dir / stale).unlink()
            log(f"removed stale {stale}")
    _write_manifest(manifest_path, entries)
    write_credits(out_dir / "CREDITS.md", credits)
    return done
