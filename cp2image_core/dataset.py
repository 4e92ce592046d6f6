"""A training set from CellProfiler exports: join object CSVs, crop each object, split by image, cache.

Input is what ExportToSpreadsheet writes: ``Image.csv`` (with FileName_<channel>/PathName_<channel>)
and one CSV per object set (ImageNumber, ObjectNumber, Location_Center_X/Y, features).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .crops import crop_objects
from .errors import DataError
from .features import select_features

log = logging.getLogger(__name__)
_MISSING = {"", "nan", "NaN", "NAN", "inf", "-inf", "Inf", "-Inf", "None", "null"}


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of an ExportToSpreadsheet file (comma or tab, UTF-8 with or without BOM)."""
    if not path.exists():
        raise DataError(f"{path} not found: export it with ExportToSpreadsheet (or check --export-dir)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    if not text.strip():
        raise DataError(f"{path} is empty")
    first = text.split("\n", 1)[0]
    delimiter = "\t" if first.count("\t") > first.count(",") else ","
    rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
    header = rows[0]
    body = [r for r in rows[1:] if r]
    # ExportToSpreadsheet's "combine objects" option writes a second header row of feature names
    if body and header and body[0] and body[0][0] not in _MISSING and not _is_number(body[0][0]):
        header = [f"{a}_{b}" if a else b for a, b in zip(header, body[0])]
        body = body[1:]
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise DataError(f"{path}, row {i}: {len(r)} values for {len(header)} columns")
    return header, body


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _numeric(path: Path, header: list[str], rows: list[list[str]], col: str) -> np.ndarray:
    """Column ``col`` as float64 (missing -> NaN); DataError naming file, row and column if not numeric."""
    if col not in header:
        raise DataError(f"{path} has no column {col!r}")
    j = header.index(col)
    out = np.empty(len(rows))
    for i, r in enumerate(rows):
        v = r[j].strip()
        if v in _MISSING:
            out[i] = np.nan
            continue
        try:
            out[i] = float(v)
        except ValueError:
            raise DataError(f"{path}, row {i + 2}, column {col}: {v!r} is not a number") from None
    return out


def _imread(path: Path, what: str) -> np.ndarray:
    """The pixels of ``path``; DataError naming it when it is missing or unreadable."""
    import skimage.io

    if not path.exists():
        raise DataError(f"{what} {path} not found (moved? use --image-root to point at its new folder)")
    try:
        return skimage.io.imread(str(path))
    except Exception as e:
        raise DataError(f"{what} {path} could not be read: {e}") from None


def load_image(path: Path) -> np.ndarray:
    """A 2-D plane scaled as CellProfiler scales it by default: integers divided by their type's maximum."""
    img = _imread(path, "Image file")
    if img.ndim == 3 and img.shape[-1] in (3, 4) and np.allclose(img[..., 0], img[..., 1]):
        img = img[..., 0]
    if img.ndim != 2:
        raise DataError(f"Image file {path} has shape {img.shape}; one grayscale plane per channel expected")
    if np.issubdtype(img.dtype, np.integer):
        return img.astype(np.float32) / np.iinfo(img.dtype).max
    return img.astype(np.float32)


def load_labels(path: Path) -> np.ndarray:
    """A label image (object numbers, as SaveImages writes ConvertObjectsToImage's uint16 output)."""
    labels = _imread(path, "Label image")
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"Label image {path} must be one plane of integer object numbers "
                        f"(got {labels.dtype} {labels.shape}); save it as 16-bit from ConvertObjectsToImage uint16")
    return labels.astype(np.int64)


@dataclass
class TrainingSet:
    """Crops, features and the split: everything training needs, cacheable as one .npz."""

    crops: np.ndarray  # (N, C, S, S) float32, CellProfiler intensity units
    features: np.ndarray  # (N, F) raw selected features (NaN where missing)
    feature_names: list[tuple[str, str]]
    channels: list[str]
    object_name: str
    image_number: np.ndarray  # (N,)
    object_number: np.ndarray  # (N,)
    is_val: np.ndarray  # (N,) bool: in the held-out images
    dropped: dict[str, list[str]] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    masks: np.ndarray | None = None  # (N, S, S) bool: the object's own pixels, when labels were exported
    cell_masks: np.ndarray | None = None  # (N, S, S) uint8: 1 the object's cell, 2 other cells, 0 background
    centers: np.ndarray | None = None  # (N, 2) Location_Center_X/Y (image shapes: source["image_shapes"])

    @property
    def train_idx(self) -> np.ndarray:
        return np.flatnonzero(~self.is_val)

    @property
    def val_idx(self) -> np.ndarray:
        return np.flatnonzero(self.is_val)

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
        np.savez(tmp, crops=self.crops, features=self.features,
                 feature_names=np.array([f"{o}\t{f}" for o, f in self.feature_names]),
                 channels=np.array(self.channels), image_number=self.image_number,
                 object_number=self.object_number, is_val=self.is_val,
                 masks=self.masks if self.masks is not None else np.zeros(0, bool),
                 cell_masks=self.cell_masks if self.cell_masks is not None else np.zeros(0, np.uint8),
                 centers=self.centers if self.centers is not None else np.zeros(0),
                 meta=np.array(json.dumps({"object_name": self.object_name, "dropped": self.dropped,
                                           "source": self.source})))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> TrainingSet:
        with np.load(path, allow_pickle=False) as d:
            meta = json.loads(str(d["meta"]))
            return cls(crops=d["crops"], features=d["features"],
                       feature_names=[tuple(s.split("\t")) for s in d["feature_names"].tolist()],
                       channels=d["channels"].tolist(), object_name=meta["object_name"],
                       image_number=d["image_number"], object_number=d["object_number"],
                       is_val=d["is_val"], dropped=meta["dropped"], source=meta["source"],
                       masks=d["masks"] if "masks" in d.files and d["masks"].ndim == 3 else None,
                       cell_masks=d["cell_masks"] if "cell_masks" in d.files and d["cell_masks"].ndim == 3 else None,
                       centers=d["centers"] if "centers" in d.files and d["centers"].ndim == 2 else None)


def split_images(image_numbers: np.ndarray, val_images: list[int] | None, val_fraction: float,
                 seed: int) -> np.ndarray:
    """Boolean mask of objects in held-out images (by field of view, never by cell)."""
    unique = np.unique(image_numbers)
    if val_images:
        unknown = sorted(set(val_images) - set(unique.tolist()))
        if unknown:
            raise DataError(f"--val-images {unknown} not found among ImageNumbers {unique.tolist()}")
        held = np.array(val_images)
    else:
        if len(unique) < 2:
            raise DataError("A split by image needs at least 2 image sets; this export has "
                            f"{len(unique)}. Export more image sets (fields of view).")
        k = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
        held = np.random.default_rng(seed).choice(unique, size=k, replace=False)
    return np.isin(image_numbers, held)


def build_training_set(
    export_dir: str | os.PathLike,
    object_name: str = "Nuclei",
    feature_objects: list[str] | None = None,
    channels: list[str] | None = None,
    crop_size: int = 64,
    val_images: list[int] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    image_root: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    mask_image: str | None = None,
    zero_outside_mask: bool = False,
    cell_mask_image: str | None = None,
) -> TrainingSet:
    """Join the object CSVs, select features, crop every object, split by image (cached if asked).

    ``mask_image`` names an exported label image of the crop objects (Image.csv's FileName_<name>): each
    crop then gets the mask of its own object, and ``zero_outside_mask`` sets the pixels outside it to 0.
    ``cell_mask_image`` names a label image of the objects built on them with the same numbers (e.g. CellsLabels,
    IdentifySecondaryObjects seeded by Nuclei): each crop gets ``cell_masks``, 1 on its object's cell, 2 on others.
    """
    if zero_outside_mask and not mask_image:
        raise DataError("Zeroing outside the object's mask needs its label image: name it with --mask-image")
    export_dir = Path(export_dir)
    feature_objects = list(feature_objects or [object_name])
    channels = list(channels or [])
    if not channels:
        raise DataError("Name at least one channel (the image names of Image.csv's FileName_<name> columns)")
    objects = dict.fromkeys([object_name, *feature_objects])
    csvs = [export_dir / "Image.csv"] + [export_dir / f"{o}.csv" for o in objects]
    key = json.dumps(["centers", str(export_dir.resolve()), object_name, feature_objects, channels, crop_size,
                      val_images, val_fraction, seed, str(image_root), mask_image, zero_outside_mask,
                      *([cell_mask_image] if cell_mask_image else []),
                      [(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in csvs if p.exists()]])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    if cache is not None:
        cache = Path(cache)
        if cache.exists():
            ts = TrainingSet.load(cache)
            if ts.source.get("key") == digest:
                log.info("training set from cache %s", cache)
                return ts
            log.info("cache %s is for other inputs; rebuilding", cache)

    img_path = export_dir / "Image.csv"
    ih, irows = _read_csv(img_path)
    inums = _numeric(img_path, ih, irows, "ImageNumber").astype(np.int64)
    files: dict[int, list[Path]] = {}
    labels_images = [name for name in (mask_image, cell_mask_image) if name]
    for ch in [*channels, *labels_images]:
        for col in (f"FileName_{ch}", f"PathName_{ch}"):
            if col not in ih:
                have = sorted(c[len("FileName_"):] for c in ih if c.startswith("FileName_"))
                raise DataError(f"{img_path} has no column {col}: channel {ch!r} is not an image of this "
                                f"export (its images: {', '.join(have) or 'none'})")
    for r, num in zip(irows, inums):
        paths = []
        for ch in [*channels, *labels_images]:
            name, folder = r[ih.index(f"FileName_{ch}")], r[ih.index(f"PathName_{ch}")]
            paths.append(Path(image_root) / name if image_root else Path(folder) / name)
        files[int(num)] = paths

    # the crop-centre objects define the rows; other object sets join on (ImageNumber, ObjectNumber)
    obj_path = export_dir / f"{object_name}.csv"
    oh, orows = _read_csv(obj_path)
    img_no = _numeric(obj_path, oh, orows, "ImageNumber").astype(np.int64)
    obj_no = _numeric(obj_path, oh, orows, "ObjectNumber").astype(np.int64)
    keys = list(zip(img_no.tolist(), obj_no.tolist()))
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise DataError(f"{obj_path}: ImageNumber {dup[0]}, ObjectNumber {dup[1]} appears twice")
    cx = _numeric(obj_path, oh, orows, "Location_Center_X")
    cy = _numeric(obj_path, oh, orows, "Location_Center_Y")
    names: list[tuple[str, str]] = []
    columns: list[np.ndarray] = []
    for o in feature_objects:
        p = export_dir / f"{o}.csv"
        h, rows = (oh, orows) if o == object_name else _read_csv(p)
        if o == object_name:
            order = np.arange(len(rows))
        else:
            index = {k: i for i, k in enumerate(zip(_numeric(p, h, rows, "ImageNumber").astype(np.int64).tolist(),
                                                     _numeric(p, h, rows, "ObjectNumber").astype(np.int64).tolist()))}
            order = np.array([index.get(k, -1) for k in keys])
        for col in h:
            if col in ("ImageNumber", "ObjectNumber"):
                continue
            try:
                v = _numeric(p, h, rows, col)
            except DataError:
                names.append((o, col))  # text column (e.g. metadata): never a feature
                columns.append(np.full(len(keys), np.nan))
                continue
            names.append((o, col))
            columns.append(np.where(order >= 0, v[np.maximum(order, 0)], np.nan))
    values = np.stack(columns, axis=1) if columns else np.zeros((len(keys), 0))
    keep, dropped = select_features(names, values)
    if not keep:
        raise DataError(f"No usable features in {', '.join(f'{o}.csv' for o in feature_objects)}: "
                        f"{ {k: len(v) for k, v in dropped.items()} } columns dropped")
    for reason, cols in dropped.items():
        if cols and reason != "not a feature":
            log.info("dropped %d %s columns: %s", len(cols), reason, ", ".join(cols[:10]))

    crops = np.zeros((len(keys), len(channels), crop_size, crop_size), dtype=np.float32)
    masks = np.zeros((len(keys), crop_size, crop_size), dtype=bool) if mask_image else None
    cell_masks = np.zeros((len(keys), crop_size, crop_size), dtype=np.uint8) if cell_mask_image else None
    shapes = {}
    for num in np.unique(img_no):
        if int(num) not in files:
            raise DataError(f"{obj_path}: ImageNumber {num} is not in {img_path}")
        rows_here = np.flatnonzero(img_no == num)
        planes = [load_image(f) for f in files[int(num)][:len(channels)]]
        centers = np.stack([cx[rows_here], cy[rows_here]], axis=1)
        if mask_image:
            labels = load_labels(files[int(num)][len(channels)]).astype(np.float32)
            cut = crop_objects(labels, centers, crop_size)[:, 0]
            masks[rows_here] = cut == obj_no[rows_here, None, None]
        if cell_mask_image:
            labels = load_labels(files[int(num)][-1]).astype(np.float32)
            cut = crop_objects(labels, centers, crop_size)[:, 0]
            own = cut == obj_no[rows_here, None, None]
            cell_masks[rows_here] = np.where(own, 1, np.where(cut > 0, 2, 0))
        if len({pl.shape for pl in planes}) != 1:
            raise DataError(f"Image set {num}: channels differ in size: "
                            + ", ".join(f"{f.name} {pl.shape}" for f, pl in zip(files[int(num)], planes)))
        crops[rows_here] = crop_objects(np.stack(planes, axis=-1), centers, crop_size)
        shapes[str(num)] = list(planes[0].shape)
        if zero_outside_mask:
            crops[rows_here] *= masks[rows_here, None]

    ts = TrainingSet(
        crops=crops, features=values[:, keep], feature_names=[names[i] for i in keep], channels=channels,
        object_name=object_name, image_number=img_no, object_number=obj_no,
        is_val=split_images(img_no, val_images, val_fraction, seed), dropped=dropped, masks=masks,
        cell_masks=cell_masks,
        centers=np.stack([cx, cy], axis=1),
        source={"key": digest, "export_dir": str(export_dir.resolve()), "feature_objects": feature_objects,
                "crop_size": crop_size, "image_shapes": shapes,
                "images": {str(k): [str(p) for p in v] for k, v in files.items()}},
    )
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        ts.save(Path(cache))
    return ts
