"""Edit pairs: each target image with its control image(s), for instruction-edit models.

An edit model (Flux.1 Kontext, Qwen-Image-Edit) learns "control in -> target out", so every
training image needs the image(s) it was made from. Two folder layouts are read, the ones
musubi-tuner and ai-toolkit users already have (both may be mixed in one folder):

- suffix layout, everything in one folder: `cat.png` (target) with `cat_control.png`, or with
  several controls `cat_control_1.png`, `cat_control_2.png`, ... (`cat_control` first, then by number);
- control folder (musubi-tuner's `control_directory`, ai-toolkit's `control_path`): `control/cat.png`
  beside the targets, any image extension; several controls as `control/cat_0.png`, `control/cat_1.png`
  (musubi-tuner numbering) or in folders `control_1/`, `control_2/`, ... each holding `cat.png`
  (ai-toolkit's `control_path_1..3`).

A control folder sits next to the targets it belongs to (also inside a kohya-ss `10_name/`
folder). Captions stay with the target (`cat.txt`). A control without its target, a target
without a control, and a target with more controls than the model takes are all named in one
message, so a broken dataset is fixed in one go.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserInputError
from .captions import CaptionOptions, caption_entries
from .images import ImageLoadOptions, load_images, shown_paths
from .resize import ResizeSpec, cover_crop, fit_pad, interpolate, resize_image, snap
from .scan import IMAGE_EXTENSIONS, EntryLabels, FolderScan, ImageEntry, _shown, path_sort_key, scan_folder

SUFFIX_CONTROL = re.compile(r"^(?P<stem>.+)_control(?:_(?P<number>\d+))?$", re.IGNORECASE)
CONTROL_FOLDER = re.compile(r"^control(?:_(?P<number>\d+))?$", re.IGNORECASE)
NUMBERED = re.compile(r"^(?P<stem>.+)_(?P<number>\d+)$")
MAX_CONTROLS = 8


@dataclass(frozen=True)
class PairOptions:
    max_controls: int = 1             # controls per target the model takes (Kontext 1, Qwen-Image-Edit-2509 3)
    max_aspect_mismatch: float = 1.25  # control vs target aspect ratio, larger factor is an error; 0 = no check

    def __post_init__(self) -> None:
        if not 1 <= self.max_controls <= MAX_CONTROLS:
            raise UserInputError(f"max controls = {self.max_controls} must be 1..{MAX_CONTROLS} "
                                 f"(Flux.1 Kontext and Qwen-Image-Edit take 1, Qwen-Image-Edit-2509 up to 3).")
        if self.max_aspect_mismatch != 0 and self.max_aspect_mismatch < 1.0:
            raise UserInputError(f"max aspect mismatch = {self.max_aspect_mismatch} must be 0 (no check) or "
                                 f"1.0 or more (1.25 is usual).")


@dataclass
class PairScan:
    targets: FolderScan                       # the target images (captions belong to these)
    controls: list[list[ImageEntry]]          # per target, its controls in order
    layouts: set[str] = field(default_factory=set)   # "suffix" and/or "folder"

    def summary(self) -> str:
        counts: dict[int, int] = {}
        for controls in self.controls:
            counts[len(controls)] = counts.get(len(controls), 0) + 1
        per = ", ".join(f"{n} with {k} control{'s' if k > 1 else ''}" for k, n in sorted(counts.items()))
        layout = " + ".join(sorted(self.layouts)) or "none"
        return f"{self.targets.summary()}\n  pairs: {per} (layout: {layout})"


def is_control_folder(name: str) -> bool:
    return CONTROL_FOLDER.match(name) is not None


def scan_pairs(root: str | os.PathLike, folder: str, recursive: bool = False, caption_extension: str = ".txt",
               max_controls: int = 1) -> PairScan:
    """Targets of `root/folder` (scan order, see scan.py) each with its controls; problems raise one message."""
    scan = scan_folder(root, folder, recursive=recursive, caption_extension=caption_extension)
    root_path = Path(root)

    targets: list[ImageEntry] = []
    suffix_controls: list[tuple[ImageEntry, str, int]] = []     # (entry, target stem, number)
    for entry in scan.entries:
        parts = entry.relative_path.split("/")
        if any(is_control_folder(p) for p in parts[:-1]):
            continue                                              # read below, beside its targets
        match = SUFFIX_CONTROL.match(parts[-1].rsplit(".", 1)[0])
        if match:
            directory = "/".join(parts[:-1])
            target_stem = f"{directory}/{match['stem']}" if directory else match["stem"]
            suffix_controls.append((entry, target_stem, int(match["number"]) if match["number"] else -1))
        else:
            targets.append(entry)

    by_stem: dict[str, list[int]] = {}
    for index, entry in enumerate(targets):
        by_stem.setdefault(os.path.splitext(entry.relative_path)[0], []).append(index)

    found: list[list[tuple[tuple[int, int], ImageEntry]]] = [[] for _ in targets]
    orphans: list[str] = []
    layouts: set[str] = set()
    for entry, target_stem, number in suffix_controls:
        if target_stem in by_stem:
            layouts.add("suffix")
            for i in by_stem[target_stem]:
                found[i].append(((0, number), entry))
        else:
            orphans.append(entry.relative_path)

    target_dirs = sorted({e.relative_path.rpartition("/")[0] for e in targets}, key=path_sort_key)
    for directory in target_dirs:
        for control_dir, folder_number in _control_folders(root_path, directory):
            for entry in _control_images(root_path, control_dir, targets, directory):
                name_stem = entry.relative_path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                exact = f"{directory}/{name_stem}" if directory else name_stem
                key = None
                if exact in by_stem:
                    key, target_stem = (folder_number, -1), exact
                else:
                    numbered = NUMBERED.match(name_stem)
                    if numbered:
                        target_stem = f"{directory}/{numbered['stem']}" if directory else numbered["stem"]
                        if target_stem in by_stem:
                            key = (folder_number, int(numbered["number"]))
                if key is None:
                    orphans.append(entry.relative_path)
                    continue
                layouts.add("folder")
                for i in by_stem[target_stem]:
                    found[i].append((key, entry))

    controls = [[entry for _, entry in sorted(items, key=lambda kv: (kv[0], path_sort_key(kv[1].relative_path)))]
                for items in found]
    _check(root_path, scan, targets, controls, orphans, max_controls)
    return PairScan(targets=scan.with_entries(targets), controls=controls, layouts=layouts)


def _control_folders(root: Path, directory: str) -> list[tuple[str, int]]:
    """(relative path, slot number) of the control folders directly inside `directory`."""
    base = root / directory if directory else root
    try:
        with os.scandir(base) as it:
            names = sorted(d.name for d in it if d.is_dir() and not d.name.startswith("."))
    except OSError:
        return []
    out = []
    for name in names:
        match = CONTROL_FOLDER.match(name)
        if match:
            out.append((f"{directory}/{name}" if directory else name, int(match["number"] or 0)))
    return out


def _control_images(root: Path, control_dir: str, targets: list[ImageEntry], directory: str) -> list[ImageEntry]:
    """The images of one control folder (not its subfolders), read with the same safety as targets."""
    folder = root / control_dir
    with os.scandir(folder) as it:
        if not any(e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS for e in it):
            return []
    scan = scan_folder(root, control_dir, recursive=False)
    # A kohya-ss target folder lends its repeats to nothing here: controls follow their target.
    return [e for e in scan.entries if e.relative_path.count("/") == control_dir.count("/") + 1]


def _listed(items: list[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check(root: Path, scan: FolderScan, targets: list[ImageEntry], controls: list[list[ImageEntry]],
           orphans: list[str], max_controls: int) -> None:
    shown = _shown(root, scan.folder)
    problems = []
    if not targets:
        problems.append(f"{shown} holds only control images ({_listed(orphans)}): put the target images (the "
                        f"result of each edit) beside them, e.g. cat.png with cat_control.png.")
        raise UserInputError(" ".join(problems))
    lonely = [t.relative_path for t, c in zip(targets, controls) if not c]
    too_many = [f"{t.relative_path} ({len(c)})" for t, c in zip(targets, controls) if len(c) > max_controls]
    if lonely:
        problems.append(
            f"{len(lonely)} of {len(targets)} target images have no control image: {_listed(lonely)}. Add "
            f"name_control.png beside name.png, or control/name.png in a control folder beside it.")
    if orphans:
        problems.append(
            f"{len(orphans)} control images have no target image: {_listed(sorted(orphans, key=path_sort_key))}. "
            f"Each needs its target with the same name (cat_control.png -> cat.png, control/cat.png -> cat.png); "
            f"rename or remove them.")
    if too_many:
        problems.append(
            f"{len(too_many)} target images have more control images than max_controls = {max_controls}: "
            f"{_listed(too_many)}. Raise max_controls to what your model takes (Qwen-Image-Edit-2509 up to 3) or "
            f"remove the extra controls.")
    if problems:
        raise UserInputError(f"Edit pairs in {shown}: " + " ".join(problems))


@dataclass
class PairDataset(EntryLabels):
    images: list[torch.Tensor]              # targets, each [H, W, 3]
    controls: list[list[torch.Tensor]]      # per target, its controls, each [H, W, 3]
    entries: list[ImageEntry]               # targets: relative path, caption, repeats
    control_entries: list[list[ImageEntry]]
    skipped: list[str]
    scan: PairScan

    def summary(self) -> str:
        lines = [self.scan.summary()]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} pairs with unreadable images:")
            lines.extend(f"  {s}" for s in self.skipped)
        return "\n".join(lines)


def load_pair_folder(root: str | os.PathLike, folder: str, recursive: bool = False,
                     captions: CaptionOptions | None = None, caption_extension: str = ".txt",
                     image: ImageLoadOptions | None = None, resize: ResizeSpec | None = None,
                     pairs: PairOptions | None = None, skip_bad: bool = False) -> PairDataset:
    """Targets and their controls, loaded; the same resize applies to both, so a pair stays aligned.

    A pair with an unreadable image is left out whole with `skip_bad`. Controls whose aspect ratio
    differs from their target's by more than `max_aspect_mismatch` are refused by name: that is
    almost always a wrong pairing, and cropping one to the other's shape would cut most of it away.
    """
    pairs = pairs or PairOptions()
    resize = resize or ResizeSpec()
    found = scan_pairs(root, folder, recursive, caption_extension, pairs.max_controls)
    targets = found.targets
    if captions is not None:
        targets = caption_entries(targets, captions)
    root_path = targets.root
    all_entries = [e for e in targets.entries] + [c for cs in found.controls for c in cs]
    shown = shown_paths(root_path, [e.relative_path for e in all_entries])
    loaded = load_images([e.path for e in all_entries], image, skip_bad=skip_bad, shown=shown)
    by_index = dict(zip(loaded.kept, loaded.images))

    images, controls, entries, control_entries, skipped = [], [], [], [], list(loaded.skipped)
    offset = len(targets.entries)
    mismatched = []
    for t, (entry, control_list) in enumerate(zip(targets.entries, found.controls)):
        indices = [t] + list(range(offset, offset + len(control_list)))
        offset += len(control_list)
        if any(i not in by_index for i in indices):
            continue                                  # skip_bad dropped part of this pair: drop all of it
        target = by_index[t]
        pair_controls = [by_index[i] for i in indices[1:]]
        if pairs.max_aspect_mismatch:
            for control, control_entry in zip(pair_controls, control_list):
                factor = aspect_mismatch(target, control)
                if factor > pairs.max_aspect_mismatch:
                    mismatched.append(
                        f"{entry.relative_path} {target.shape[1]}x{target.shape[0]} vs {control_entry.relative_path} "
                        f"{control.shape[1]}x{control.shape[0]}")
        images.append(resize_image(target, resize))
        controls.append([resize_image(c, resize) for c in pair_controls])
        entries.append(entry)
        control_entries.append(list(control_list))
    if mismatched:
        raise UserInputError(
            f"{len(mismatched)} control images have a very different aspect ratio from their target (more than "
            f"{pairs.max_aspect_mismatch:g}x apart): {_listed(mismatched, 5)}. Is each control paired with the right "
            f"target? Crop or pad them to the same shape; if the shapes differ on purpose (a reference of another "
            f"shape, as Qwen-Image-Edit-2509 allows), raise max_aspect_mismatch or set it to 0.")
    if not images:
        raise UserInputError(f"No complete edit pair could be read ({'; '.join(skipped[:3])}): re-export the images.")
    return PairDataset(images=images, controls=controls, entries=entries, control_entries=control_entries,
                       skipped=skipped, scan=found)


def aspect_mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """How many times wider (or taller) one [H, W, C] image is than the other, relative to its height."""
    ra, rb = a.shape[1] / a.shape[0], b.shape[1] / b.shape[0]
    return max(ra, rb) / min(ra, rb)


def as_one_size(controls: list[torch.Tensor], pad_color=(0, 0, 0)) -> list[torch.Tensor]:
    """Controls of one target brought to the first one's size (padded, nothing cut) so they stack as a batch."""
    if not controls:
        return controls
    height, width = controls[0].shape[0], controls[0].shape[1]
    return [c if c.shape[:2] == controls[0].shape[:2] else fit_pad(c, width, height, pad_color) for c in controls]


# ---- control sizes: each edit family's rule ------------------------------------------------------

CONTROL_RESIZE_MODES = ("family", "match_target", "target_area", "area_1024", "none")


def control_size(mode: str, control_wh: tuple[int, int], target_wh: tuple[int, int], multiple: int = 16
                 ) -> tuple[int, int] | None:
    """(width, height) a control image is encoded at, or None to keep it as it is.

    match_target: exactly the target's size (cover-cropped; what musubi-tuner and ai-toolkit do by
    default, and how Flux.1 Kontext is run); target_area: the target's pixel count at the control's
    own aspect ratio; area_1024: 1024x1024 pixels at its own aspect ratio (ComfyUI's
    TextEncodeQwenImageEdit nodes at inference); none: unchanged (cropped to the multiple by the VAE).
    """
    if mode not in CONTROL_RESIZE_MODES or mode == "family":
        raise UserInputError(f"control resize {mode!r} is not an option: use one of "
                             f"{', '.join(m for m in CONTROL_RESIZE_MODES if m != 'family')}.")
    if mode == "none":
        return None
    if mode == "match_target":
        return target_wh
    area = target_wh[0] * target_wh[1] if mode == "target_area" else 1024 * 1024
    scale = math.sqrt(area / (control_wh[0] * control_wh[1]))
    return snap(control_wh[0] * scale, multiple), snap(control_wh[1] * scale, multiple)


def resize_control(control: torch.Tensor, mode: str, target_wh: tuple[int, int]) -> torch.Tensor:
    """A control [H, W, 3] at the size `control_size` gives (cover-cropped when the aspect ratio changes)."""
    size = control_size(mode, (control.shape[1], control.shape[0]), target_wh)
    if size is None:
        return control
    if mode == "match_target":
        return cover_crop(control, *size)
    return interpolate(control, *size)


# ---- edit model families -------------------------------------------------------------------------

@dataclass(frozen=True)
class EditFamily:
    """What one edit model takes: how many controls, at what size, and how its prompt sees them."""
    label: str                  # as shown in Make Training Dataset
    key: str                    # recorded in each sample's conditioning, checked against the model in training
    max_controls: int
    control_resize: str         # the "family" rule of control_size
    text_encoding: str          # "plain": text only; "qwen_edit" / "qwen_edit_plus": the prompt also sees the controls
    model_configs: tuple[str, ...]   # ComfyUI model config names this family loads as
    tokenizer_hint: str         # part of the text encoder's tokenizer class name


EDIT_FAMILIES = {
    f.label: f for f in (
        # Kontext and ComfyUI's workflows run the control at the output size: train it so.
        EditFamily("Flux.1 Kontext", "flux_kontext", 1, "match_target", "plain", ("Flux",), "Flux"),
        # ComfyUI's TextEncodeQwenImageEdit(Plus) encode references at 1024x1024 pixels, own aspect ratio.
        EditFamily("Qwen-Image-Edit", "qwen_image_edit", 1, "area_1024", "qwen_edit", ("QwenImage",), "Qwen"),
        EditFamily("Qwen-Image-Edit-2509 / 2511", "qwen_image_edit_plus", 3, "area_1024", "qwen_edit_plus",
                   ("QwenImage",), "Qwen"),
    )
}
EDIT_FAMILY_KEY = "lora_trainer_edit_model"   # conditioning key naming the family a sample was made for


def edit_family(label: str) -> EditFamily:
    if label not in EDIT_FAMILIES:
        raise UserInputError(f"edit model {label!r} is not an option: use one of {', '.join(EDIT_FAMILIES)}.")
    return EDIT_FAMILIES[label]


def family_by_key(key: str) -> EditFamily | None:
    return next((f for f in EDIT_FAMILIES.values() if f.key == key), None)
