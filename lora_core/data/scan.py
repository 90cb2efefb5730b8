"""Find the training images in a folder, in an order that never changes between runs.

Order is by path relative to the folder, compared part by part in natural order ("img2" before
"img10"), so a dataset encodes the same way on every machine. kohya-ss folders named `N_concept`
give their images a repeat count N: a sampling weight, never N copies in memory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import UserInputError
from .paths import is_inside, resolve_inside

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ImageEntry:
    path: Path                  # absolute path of the image file
    relative_path: str          # relative to the scan root, forward slashes
    repeats: int = 1            # kohya-ss sampling weight
    concept: str = ""           # name part of the `N_concept` folder, "" outside one
    caption: str | None = None  # None until captions are read (see captions.py)


class EntryLabels:
    """Captions and repeats read off `self.entries`, for every container of ImageEntry rows
    (folder scans, edit pairs, video folders) so the three agree on what a missing caption is."""

    entries: list[ImageEntry]

    @property
    def captions(self) -> list[str]:
        return ["" if e.caption is None else e.caption for e in self.entries]

    @property
    def repeats(self) -> list[int]:
        return [e.repeats for e in self.entries]


@dataclass
class FolderScan(EntryLabels):
    root: Path
    folder: Path
    entries: list[ImageEntry]
    caption_files: dict[str, str] = field(default_factory=dict)   # relative path minus extension -> caption file
    caption_files_without_image: list[str] = field(default_factory=list)
    caption_extension: str = ".txt"

    @property
    def paths(self) -> list[Path]:
        return [e.path for e in self.entries]

    def with_entries(self, entries: list[ImageEntry]) -> "FolderScan":
        return replace(self, entries=list(entries))

    def summary(self) -> str:
        """One line per concept: what the user should check before a long encode."""
        per_concept: dict[tuple[str, int], int] = {}
        for e in self.entries:
            per_concept[(e.concept, e.repeats)] = per_concept.get((e.concept, e.repeats), 0) + 1
        lines = [f"{len(self.entries)} images in {_shown(self.root, self.folder)}"]
        for (concept, repeats), count in sorted(per_concept.items()):
            lines.append(f"  {concept or '(no concept folder)'}: {count} images x {repeats} repeats")
        return "\n".join(lines)


def natural_key(text: str) -> list:
    """Sort key where digit runs compare as numbers; text parts compare case-insensitively."""
    pieces = re.split(r"(\d+)", text)
    return [int(p) if i % 2 else p.casefold() for i, p in enumerate(pieces)]


def path_sort_key(relative_path: str) -> tuple:
    parts = relative_path.split("/")
    # The raw path breaks ties ("A.png" vs "a.png") so the order is total.
    return ([natural_key(p) for p in parts], relative_path)


def kohya_repeats(folder_name: str, where: str) -> tuple[int, str] | None:
    """(repeats, concept) for a `N_concept` folder name, None for any other name."""
    match = KOHYA_FOLDER.match(folder_name)
    if match is None:
        return None
    repeats = int(match.group(1))
    if repeats < 1:
        raise UserInputError(
            f"Folder {where} asks for {repeats} repeats: kohya-ss folders are named N_concept "
            f"with N >= 1; rename it (e.g. 1_{match.group(2)})."
        )
    return repeats, match.group(2)


def scan_folder(root: str | os.PathLike, folder: str, recursive: bool = False,
                caption_extension: str = ".txt", extensions: frozenset[str] = IMAGE_EXTENSIONS,
                kind: str = "images") -> FolderScan:
    """The images in `root/folder` (sorted), each with its kohya-ss repeats and concept.

    Without `recursive`, the folder itself and its direct `N_concept` subfolders are read (the
    kohya-ss layout); with it, every subfolder, and an image takes the repeats of the nearest
    `N_concept` folder above it. Hidden files and folders (".name") are skipped. `extensions`
    (lower case, with the dot) picks the files; `kind` names them in messages ("videos").
    """
    if not caption_extension.startswith(".") or len(caption_extension) < 2:
        raise UserInputError(
            f"caption extension {caption_extension!r} must start with a dot, e.g. '.txt' or '.caption'."
        )
    root_path = Path(root)
    base = resolve_inside(root_path, folder, what="folder")
    shown = _shown(root_path, base)
    if not base.exists():
        raise UserInputError(f"Folder {shown} does not exist: create it and put the images there.")
    if not base.is_dir():
        raise UserInputError(f"{shown} is a file, not a folder: pick the folder that holds the images.")

    walk = _FolderWalk(root_path, base, recursive, caption_extension.lower(), extensions)
    walk.visit(())

    if not walk.images:
        hint = ""
        if walk.skipped_subfolders and not recursive:
            hint = (f" It has subfolders ({', '.join(sorted(walk.skipped_subfolders)[:5])}): turn on "
                    f"'recursive' or name them N_concept (kohya-ss layout, e.g. 10_dog).")
        raise UserInputError(
            f"No {kind} found in {shown} (supported: {', '.join(sorted(extensions))}).{hint} "
            f"Put the training {kind} in that folder."
        )

    entries = []
    for path, relative, dir_parts in walk.images:
        repeats, concept = 1, ""
        for depth in range(len(dir_parts), 0, -1):
            found = kohya_repeats(dir_parts[depth - 1], _shown(root_path, base.joinpath(*dir_parts[:depth])))
            if found is not None:
                repeats, concept = found
                break
        entries.append(ImageEntry(path=path, relative_path=relative, repeats=repeats, concept=concept))
    entries.sort(key=lambda e: path_sort_key(e.relative_path))
    image_stems = {os.path.splitext(e.relative_path)[0] for e in entries}
    orphans = sorted((rel for stem, rel in walk.caption_files.items() if stem not in image_stems),
                     key=path_sort_key)
    return FolderScan(root=root_path, folder=base, entries=entries, caption_files=walk.caption_files,
                      caption_files_without_image=orphans, caption_extension=caption_extension.lower())


class _FolderWalk:
    """Collects images and caption files below `base`, refusing symlinks that leave `root`."""

    def __init__(self, root: Path, base: Path, recursive: bool, caption_ext: str,
                 extensions: frozenset[str] = IMAGE_EXTENSIONS) -> None:
        self.root, self.base, self.recursive, self.caption_ext = root, base, recursive, caption_ext
        self.extensions = extensions
        self.prefix = _base_parts(root, base)
        self.images: list[tuple[Path, str, tuple[str, ...]]] = []   # (path, relative path, folders below base)
        self.caption_files: dict[str, str] = {}                     # relative path without extension -> file
        self.skipped_subfolders: list[str] = []
        self.visited = {os.path.realpath(base)}                     # a symlink loop is read once

    def visit(self, dir_parts: tuple[str, ...]) -> None:
        directory = self.base.joinpath(*dir_parts)
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda d: d.name)
        except OSError as err:
            raise UserInputError(
                f"Cannot read folder {_shown(self.root, directory)} ({err.strerror}): check its permissions."
            ) from err
        for child in children:
            if not child.name.startswith("."):
                self._visit_child(child, dir_parts)

    def _visit_child(self, child: os.DirEntry, dir_parts: tuple[str, ...]) -> None:
        child_path = Path(child.path)
        if child.is_symlink() and not is_inside(self.root, child_path):
            raise UserInputError(
                f"{_shown(self.root, child_path, child.is_dir())} is a symlink to {os.path.realpath(child_path)}, "
                f"outside {self.root}: copy the files into {self.root} instead of linking them."
            )
        if child.is_dir():
            wanted = self.recursive or (not dir_parts and KOHYA_FOLDER.match(child.name) is not None)
            real = os.path.realpath(child_path)
            if not wanted:
                self.skipped_subfolders.append(child.name)
            elif real not in self.visited:
                self.visited.add(real)
                self.visit(dir_parts + (child.name,))
        elif child.is_file():
            relative = "/".join(self.prefix + dir_parts + (child.name,))
            stem, ext = os.path.splitext(relative)
            if ext.lower() in self.extensions:
                self.images.append((child_path, relative, dir_parts))
            elif ext.lower() == self.caption_ext:
                self.caption_files[stem] = relative


def _base_parts(root: Path, base: Path) -> tuple[str, ...]:
    below = Path(base).relative_to(root).as_posix()
    return () if below == "." else tuple(below.split("/"))


def _shown(root: Path, path: Path, is_dir: bool = True) -> str:
    """`input/dogs/` style: the root's own name plus the path below it, as users see it."""
    try:
        below = Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)
    if below == ".":
        return f"{Path(root).name}/"
    return f"{Path(root).name}/{below}{'/' if is_dir else ''}"
