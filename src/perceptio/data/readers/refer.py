"""RefCOCO / RefCOCO+ / RefCOCOg in the ``refer`` layout (lichengunc/refer), as LISA and Sa2VA read it.

Layout: ``<root>/<refcoco|refcoco+|refcocog>/instances.json`` (COCO images, annotations, categories) and
``refs(<split_by>).p``, a Python-2 pickle holding a list of refs. Each sentence of each ref becomes one
:class:`~perceptio.data.schema.Sample`, the unit LISA and Sa2VA evaluate. Images are COCO *train2014* files
in a separate folder; they are only referenced here and decoded on use.

The pickle is read with an unpickler that builds plain data only (lists, dicts, strings, numbers), so a
tampered ``refs(*.p)`` file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from perceptio.data.errors import BadItemReport, DataError
from perceptio.data.readers._common import (
    build_samples,
    check_skip_args,
    read_json,
    require_dir,
    require_fields,
    require_file,
    select_split,
)
from perceptio.data.schema import ImageRef, MaskRef, Sample, Task

__all__ = ["DEFAULT_SPLIT_BY", "assert_no_eval_images", "eval_image_ids", "load_refs", "read_refer"]

#: Default ``split_by`` per dataset folder; LISA and Sa2VA hard-code the same choice.
DEFAULT_SPLIT_BY: dict[str, str] = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
_ALIASES = {"refcoco_plus": "refcoco+"}
# COCO file names: train2014/val2014 carry a prefix, 2017 names are the bare zero-padded id.
_COCO_NAME_RE = re.compile(r"(?:COCO_[a-z]+\d{4}_)?(\d{12})\.(?:jpe?g|png)", re.IGNORECASE)


class _ForbiddenGlobalError(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global: only containers, strings, bytes and numbers can be built.

    Every way a pickle can call code (REDUCE, INST, OBJ, NEWOBJ, extension codes) first needs a callable
    looked up through ``find_class``, so refusing it here is sufficient.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise _ForbiddenGlobalError(module, name)


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    """Load a ``refs(<split_by>).p`` pickle safely and return its list of ref dicts.

    Python-2 pickles are read with the default (ASCII) string decoding first and with ``latin1`` when that
    fails. Raises DataError when the file is missing, corrupt, not a list of dicts, or asks for any global.
    """
    path = Path(path)
    require_file(
        path, what="refs pickle", fix="expected refs(unc).p / refs(umd).p / refs(google).p from the refer data"
    )
    payload = path.read_bytes()
    refs: Any = None
    for encoding in ("ASCII", "latin1"):
        try:
            refs = _PlainDataUnpickler(io.BytesIO(payload), encoding=encoding).load()
            break
        except UnicodeDecodeError:
            continue  # a Python-2 str with non-ASCII bytes; latin1 maps every byte
        except _ForbiddenGlobalError as err:
            raise DataError(
                f"refusing to load global {err.qualname!r}: only plain data is allowed in a refs pickle",
                path=path,
                fix="this file is not a refer annotation file (or was tampered with); re-download it",
            ) from None
        except Exception as err:  # corrupt pickles raise many types (EOFError, KeyError, ...); pickle lists none
            raise DataError(
                f"refs pickle cannot be read ({type(err).__name__}: {err})",
                path=path,
                fix="the file is truncated or not a pickle; re-download it",
            ) from None
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        raise DataError(
            f"refs pickle holds a {type(refs).__name__}, expected a list of ref dicts",
            path=path,
            fix="use the refs(*.p) file from the refer data release",
        )
    return refs


def _dataset_folder(dataset: str, root: Path) -> str:
    name = _ALIASES.get(dataset, dataset)
    if name not in DEFAULT_SPLIT_BY:
        known = sorted([*DEFAULT_SPLIT_BY, *_ALIASES])
        raise DataError(f"unknown refer dataset {dataset!r}", path=root, fix=f"use one of {known}")
    return name


def _split_predicate(refs: Sequence[dict[str, Any]], split: str, path: Path) -> Callable[[str], bool]:
    """refer.getRefIds semantics: testA/B/C select splits containing that letter, ``test`` any test split."""
    available = [str(ref.get("split")) for ref in refs]

    def matcher(wanted: str) -> Callable[[str], bool]:
        if wanted in ("testA", "testB", "testC"):
            return lambda name: wanted[-1] in name
        if wanted == "test":
            return lambda name: "test" in name
        return lambda name: name == wanted

    selectable = sorted(
        {*available, *(w for w in ("test", "testA", "testB", "testC") if any(map(matcher(w), available)))}
    )
    if split not in selectable:
        raise DataError(
            f"unknown split {split!r}; this file's refs select {selectable} (test: every test split)",
            path=path,
            fix=f"pass one of {selectable}",
        )
    return select_split(available, split, path=path, matches=matcher(split))


def _resolve_image_root(root: Path, folder: str, image_root: str | Path | None, probe: str | None) -> Path:
    if image_root is not None:
        image_root = Path(image_root)
        if not image_root.is_dir():
            raise DataError("image root not found", path=image_root, fix="pass the COCO train2014 image folder")
        return image_root
    # LISA's folder sits inside root/images, so it is tried before the generic root/images.
    candidates = [
        root / "images" / "mscoco" / "images" / "train2014",  # LISA: refer_seg/images/mscoco/images/train2014
        root / "images",
        root.parent / "glamm_data" / "images" / "coco2014" / "train2014",  # Sa2VA evaluation
        root / folder / "coco2014" / "train2014",  # Sa2VA training
    ]
    existing = [candidate for candidate in candidates if candidate.is_dir()]
    if not existing:
        tried = ", ".join(str(candidate) for candidate in candidates)
        raise DataError(
            f"no COCO train2014 image folder found; tried {tried}",
            path=root,
            fix="pass image_root=<folder with COCO_train2014_*.jpg>",
        )
    # One stat per candidate (not per image) picks the folder that really holds the images.
    for candidate in existing:
        if probe is not None and (candidate / probe).is_file():
            return candidate
    return existing[0]


def read_refer(
    root: str | Path,
    dataset: str = "refcoco",
    *,
    split: str = "val",
    split_by: str | None = None,
    image_root: str | Path | None = None,
    skip_bad: bool = False,
    report: BadItemReport | None = None,
) -> list[Sample]:
    """Read one split of RefCOCO, RefCOCO+ (``refcoco+`` or ``refcoco_plus``) or RefCOCOg.

    Args:
        root: the folder holding ``refcoco/``, ``refcoco+/`` and ``refcocog/``.
        dataset: which dataset folder to read.
        split: ``train``, ``val``, ``testA``, ``testB``, ``testC`` or ``test`` (refer.getRefIds semantics).
        split_by: the refs file to use, ``refs(<split_by>).p``; default unc for refcoco/refcoco+, umd for refcocog.
        image_root: the COCO train2014 folder; default: the first existing LISA or Sa2VA location under ``root``.
        skip_bad: record bad refs in ``report`` and skip them instead of raising.
        report: where skipped refs are recorded.

    Returns:
        One referring-segmentation sample per sentence of every selected ref, with lazy image and mask refs.
        gRefCOCO-style no-target refs (``ann_id`` -1 or ``[-1]``) get an empty ``masks`` tuple.
    """
    check_skip_args(skip_bad, report)
    root = Path(root)
    folder = _dataset_folder(dataset, root)
    split_by = split_by or DEFAULT_SPLIT_BY[folder]
    require_dir(root / folder, what=f"{folder} folder", fix=f"root must hold {folder}/ with instances.json and refs")
    refs_path = root / folder / f"refs({split_by}).p"
    instances_path = root / folder / "instances.json"
    require_file(instances_path, what="instances.json", fix=f"expected the refer release file for {folder}")
    refs = load_refs(refs_path)
    selected = _split_predicate(refs, split, refs_path)

    instances = read_json(instances_path, what="instances.json", fix=f"expected the refer release file for {folder}")
    if not isinstance(instances, dict) or not {"images", "annotations"} <= set(instances):
        raise DataError(
            "instances.json must be an object with 'images' and 'annotations' lists",
            path=instances_path,
            fix="use the instances.json of the refer release",
        )
    images = {image.get("id"): image for image in instances["images"]}
    annotations = {ann.get("id"): ann for ann in instances["annotations"]}
    categories = {cat.get("id"): cat.get("name") for cat in instances.get("categories", [])}

    chosen = [(i, ref) for i, ref in enumerate(refs) if selected(str(ref.get("split")))]
    probe = images.get(chosen[0][1].get("image_id"), {}).get("file_name") if chosen else None
    image_dir = _resolve_image_root(root, folder, image_root, probe)

    def build(indexed: tuple[int, dict[str, Any]]) -> list[Sample]:
        index, ref = indexed
        item = f"ref {ref['ref_id']}" if "ref_id" in ref else f"ref #{index}"
        require_fields(ref, ["ref_id", "ann_id", "image_id", "sentences"], path=refs_path, item=item)
        image = images.get(ref["image_id"])
        if image is None:
            raise DataError(
                f"image_id {ref['image_id']} is not in instances.json",
                path=refs_path,
                item=item,
                fix=f"the refs file and {instances_path} do not belong together",
            )
        require_fields(image, ["file_name", "height", "width"], path=instances_path, item=f"image {ref['image_id']}")
        height, width = int(image["height"]), int(image["width"])
        ann_ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
        masks: list[MaskRef] = []
        category_id = ref.get("category_id")
        for ann_id in ann_ids:
            if ann_id == -1:  # gRefCOCO: no target
                continue
            ann = annotations.get(ann_id)
            if ann is None or ann.get("image_id") != ref["image_id"]:
                problem = "is not in instances.json" if ann is None else f"belongs to image {ann.get('image_id')}"
                raise DataError(
                    f"ann_id {ann_id} {problem}",
                    path=refs_path,
                    item=item,
                    fix=f"the refs file and {instances_path} do not belong together",
                )
            # gRefCOCO builds multi-object targets from the non-crowd members only.
            if len(ann_ids) > 1 and ann.get("iscrowd"):
                continue
            category_id = category_id if category_id is not None else ann.get("category_id")
            masks.append(MaskRef(ann.get("segmentation"), height, width, name=f"{instances_path} [ann {ann_id}]"))
        if not isinstance(ref["sentences"], list) or not all(isinstance(s, dict) for s in ref["sentences"]):
            raise DataError("'sentences' must be a list of dicts", path=refs_path, item=item, fix="check the refs file")
        sent_ids = ref.get("sent_ids") or []
        samples = []
        for position, sentence in enumerate(ref["sentences"]):
            sent_id = sentence.get("sent_id", sent_ids[position] if position < len(sent_ids) else None)
            if sent_id is None or not isinstance(sentence.get("sent"), str):
                raise DataError(
                    f"sentence {position} lacks 'sent_id' or a 'sent' string",
                    path=refs_path,
                    item=item,
                    fix="every sentence needs sent_id and sent",
                )
            meta = {
                "image_id": ref["image_id"],
                "ann_id": ann_ids if isinstance(ref["ann_id"], list) else ref["ann_id"],
                "ref_id": ref["ref_id"],
                "sent_id": sent_id,
                "category_id": category_id,
                "category": categories.get(category_id),
                "raw": sentence.get("raw", sentence["sent"]),
                "split_by": split_by,
                "ref_split": ref.get("split"),
            }
            samples.append(
                Sample(
                    sample_id=f"{ref['ref_id']}_{sent_id}",
                    task=Task.REFERRING_SEGMENTATION,
                    source=folder,
                    split=split,
                    images=(ImageRef(path=image_dir / image["file_name"], size=(width, height)),),
                    query=sentence["sent"],
                    masks=tuple(masks),
                    meta=meta,
                )
            )
        return samples

    return build_samples(chosen, build, skip_bad=skip_bad, report=report)


# ------------------------------------------------------------------------------------------------ leakage


def eval_image_ids(root: str | Path, datasets: Sequence[str] = ("refcoco", "refcoco+", "refcocog")) -> set[int]:
    """Return the COCO image ids of every non-train ref of every listed dataset folder under ``root``.

    RefCOCO/+/g evaluation images are COCO train2014 images, so any co-training set built on COCO must be
    filtered against these ids. Folders that do not exist are skipped; if none exists, DataError is raised
    (an empty guard would pass everything).
    """
    root = Path(root)
    ids: set[int] = set()
    found = []
    for dataset in datasets:
        folder = _dataset_folder(dataset, root)
        if not (root / folder).is_dir():
            continue
        found.append(folder)
        refs = load_refs(root / folder / f"refs({DEFAULT_SPLIT_BY[folder]}).p")
        ids.update(int(ref["image_id"]) for ref in refs if ref.get("split") != "train" and "image_id" in ref)
    if not found:
        raise DataError(
            f"none of the dataset folders {list(datasets)} exists",
            path=root,
            fix="pass the refer root that holds refcoco/, refcoco+/ and refcocog/",
        )
    return ids


def _coco_image_id(item: Any) -> int | None:
    """The COCO image id of an id, a file name, or a Sample (its meta image_id, else its image file names)."""
    if isinstance(item, bool):
        return None
    if isinstance(item, int):
        return item
    if isinstance(item, str | Path):
        text = str(item)
        if text.isdigit():
            return int(text)
        match = _COCO_NAME_RE.fullmatch(Path(text).name)
        # A bare 12-digit name is a COCO 2017 file only when the path says it is COCO.
        if match and (Path(text).name.upper().startswith("COCO_") or "coco" in text.lower()):
            return int(match.group(1))
        return None
    if isinstance(item, Sample):
        if isinstance(item.meta.get("image_id"), int | str):
            return _coco_image_id(item.meta["image_id"])
        for image in item.images:
            if image.path is not None and (found := _coco_image_id(image.path)) is not None:
                return found
    return None


def assert_no_eval_images(
    image_ids_or_samples: Iterable[int | str | Path | Sample], eval_ids: set[int], *, manifest: str
) -> None:
    """Raise DataError when a training manifest uses any RefCOCO/+/g evaluation image.

    Args:
        image_ids_or_samples: COCO image ids, COCO image file names/paths (``COCO_train2014_<id>.jpg``,
            ``coco/train2017/<id>.jpg``), or samples (``meta["image_id"]``, else their image paths). Items
            whose COCO id cannot be told (non-COCO images) are not checked.
        eval_ids: the ids to refuse, usually :func:`eval_image_ids`.
        manifest: how to name the training data in the error.
    """
    offending = sorted(
        {found for item in image_ids_or_samples if (found := _coco_image_id(item)) is not None and found in eval_ids}
    )
    if offending:
        raise DataError(
            f"training data contains {len(offending)} image(s) from RefCOCO/+/g evaluation splits, "
            f"e.g. image_id {offending[:5]}",
            path=manifest,
            fix="drop these images from the training manifest (filter against eval_image_ids(root))",
        )
