"""Synthetic image-text data in the precomputed-feature format, with planted structure.

The generator writes what a real SCAN / VSE++ / CHAN folder holds, so every code path of
real data runs on it, and a model that learns shows it in the recall:

* ``n_concepts`` latent concepts, each with a unit direction in feature space and a
  made-up pronounceable word (``"bako"``, ``"temiru"``, ...). Concepts come in groups of
  about five whose directions share a component (cosine ~0.36 within a group), like
  visually similar classes.
* An image holds 3-6 concepts. About 60% of its regions are noisy views of them (two or
  more regions per concept when there is room): ``amplitude * direction + noise``; the
  others are background clutter (directions not named by any word). Every region of an
  image also carries the image's own random "style" offset, and all images share a global
  offset (a modality gap).
* Each image has ``captions_per_image`` captions; each names a random subset (>= 2) of the
  image's concepts in random order, among filler words ("a", "the", "with", "near", ...),
  6 to 20 words long.
* ``glove_synthetic.txt`` holds word vectors (GloVe text format, 300-d by default) of every
  concept and filler word. A concept's vector is correlated (cosine ~0.8) with a fixed
  random projection of its direction, so vectors of concepts in the same group are
  similar and initialising word embeddings from them helps.

Files written (for split in train, dev, test): ``{split}_ims.npy`` (n, R, F) float32,
``{split}_caps.txt``, ``{split}_ids.txt`` (one id per image), plus ground truth that real
data lacks: ``{split}_concepts.txt`` (the concept words of each image), and
``{split}_region_concepts.npy`` (n, R) int16 (concept id of each region, -1 = background),
``concept_directions.npy`` (n_concepts, F) float32, ``meta.json`` and ``README.txt``.

Output is a pure function of the arguments (same bytes for the same seed), and the folder
appears atomically: it is generated in a temporary sibling folder, then renamed.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "dev", "test")
GLOVE_FILE = "glove_synthetic.txt"
META_FILE = "meta.json"
_GENERATOR = "fastalign.synthetic"
_VERSION = 1

FILLER_WORDS = (
    "a", "an", "the", "with", "near", "and", "of", "on", "in", "some", "two", "is",
    "are", "next", "to", "by", "beside", "under", "there", "photo", "picture", "showing",
    "while", "at",
)  # fmt: skip

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)

# planted-structure constants (documented in meta.json)
_GROUP_SIZE = 5
_GROUP_WEIGHT = 0.6  # share of a concept direction that comes from its group
_FOREGROUND_FRACTION = 0.6
_REGION_NOISE = 0.8  # norm of the per-region noise
_AMPLITUDE = (0.7, 1.3)
_N_CLUTTER = 10
_CLUTTER_WEIGHT = 0.6
_STYLE_NORM = 0.6
_OFFSET_NORM = 0.5
_WORD_CORRELATION = 0.8
_WORD_COMPONENT_STD = 0.4
_CAPTION_LENGTH = (6, 20)
_CONCEPTS_PER_IMAGE = (3, 6)


def concept_word(index: int, n_concepts: int) -> str:
    """The made-up word of concept ``index`` (consonant-vowel syllables, >= 2 of them)."""
    n_syllables = max(2, math.ceil(math.log(max(n_concepts, 2)) / math.log(len(_SYLLABLES))))
    space = len(_SYLLABLES) ** n_syllables
    # a fixed bijection of [0, space) (1031 is prime to 70) so neighbouring ids look unalike
    value = (index * 1031 + 7) % space
    parts = []
    for _ in range(n_syllables):
        parts.append(_SYLLABLES[value % len(_SYLLABLES)])
        value //= len(_SYLLABLES)
    return "".join(parts)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    # elementwise ops and numpy's own pairwise sum only (no BLAS): identical bytes anywhere
    return x / np.sqrt((x * x).sum(axis=-1, keepdims=True))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _params(**kwargs: Any) -> dict[str, int]:
    minimum = dict(
        seed=0,
        n_train=1,
        n_val=1,
        n_test=1,
        n_concepts=3,
        n_regions=3,
        feature_dim=2,
        word_dim=1,
        captions_per_image=1,
    )
    return {k: _check_int(k, v, minimum[k]) for k, v in kwargs.items()}


def _concepts(p: dict[str, int]) -> dict[str, Any]:
    rng = np.random.default_rng([p["seed"], 0])
    n, dim = p["n_concepts"], p["feature_dim"]
    n_groups = max(1, round(n / _GROUP_SIZE))
    group_of = rng.permutation(np.arange(n) % n_groups)
    groups = _unit_rows(rng.standard_normal((n_groups, dim)))
    own = _unit_rows(rng.standard_normal((n, dim)))
    mix = math.sqrt(1.0 - _GROUP_WEIGHT**2)
    directions = _unit_rows(_GROUP_WEIGHT * groups[group_of] + mix * own).astype(np.float32)
    clutter = _unit_rows(rng.standard_normal((_N_CLUTTER, dim))).astype(np.float32)
    offset = (_OFFSET_NORM * _unit_rows(rng.standard_normal(dim))).astype(np.float32)

    words = []
    taken = set(FILLER_WORDS)
    index = 0
    while len(words) < n:
        word = concept_word(index, n)
        index += 1
        if word not in taken:
            taken.add(word)
            words.append(word)

    # word vectors: correlated with a fixed random projection of each concept's direction
    wdim = p["word_dim"]
    projection = rng.standard_normal((wdim, dim)) / math.sqrt(dim)
    projected = np.stack([(projection * d.astype(np.float64)).sum(axis=1) for d in directions])
    noise = rng.standard_normal((n, wdim))
    if wdim > 1:
        projected = _unit_rows(projected)
        noise = _unit_rows(noise)
    corr = _WORD_CORRELATION
    concept_vectors = corr * projected + math.sqrt(1.0 - corr**2) * noise
    if wdim > 1:
        concept_vectors = _unit_rows(concept_vectors)
    filler_vectors = rng.standard_normal((len(FILLER_WORDS), wdim))
    if wdim > 1:
        filler_vectors = _unit_rows(filler_vectors)
    scale = _WORD_COMPONENT_STD * math.sqrt(wdim)
    return dict(
        directions=directions,
        group_of=group_of,
        clutter=clutter,
        offset=offset,
        words=words,
        word_vectors=np.concatenate([concept_vectors, filler_vectors]) * scale,
    )


def _write_split(
    folder: Path, split: str, split_number: int, n_images: int, first_id: int, p: dict, c: dict
) -> None:
    rng = np.random.default_rng([p["seed"], split_number])
    n_regions, dim, cpi = p["n_regions"], p["feature_dim"], p["captions_per_image"]
    n_concepts = p["n_concepts"]
    directions = np.concatenate([c["directions"], c["clutter"]])  # clutter ids = n_concepts..
    images = np.lib.format.open_memmap(
        folder / f"{split}_ims.npy", mode="w+", dtype=np.float32, shape=(n_images, n_regions, dim)
    )
    region_concepts = np.empty((n_images, n_regions), dtype=np.int16)
    captions, image_concepts = [], []
    noise_scale = np.float32(_REGION_NOISE / math.sqrt(dim))
    low, high = _CONCEPTS_PER_IMAGE
    for i in range(n_images):
        k = min(int(rng.integers(low, high + 1)), n_concepts, n_regions)
        concepts = np.sort(rng.choice(n_concepts, size=k, replace=False))
        n_fg = min(n_regions, max(k, round(_FOREGROUND_FRACTION * n_regions)))
        per_concept = 2 if n_fg >= 2 * k else 1
        labels = np.concatenate(
            [
                np.repeat(concepts, per_concept),
                rng.choice(concepts, size=n_fg - per_concept * k),
                n_concepts + rng.integers(0, _N_CLUTTER, size=n_regions - n_fg),
            ]
        )
        labels = rng.permutation(labels)
        amplitude = rng.uniform(*_AMPLITUDE, size=n_regions).astype(np.float32)
        amplitude[labels >= n_concepts] *= np.float32(_CLUTTER_WEIGHT)
        style = (_STYLE_NORM * _unit_rows(rng.standard_normal(dim))).astype(np.float32)
        noise = rng.standard_normal((n_regions, dim), dtype=np.float32) * noise_scale
        images[i] = amplitude[:, None] * directions[labels] + noise + (style + c["offset"])
        region_concepts[i] = np.where(labels < n_concepts, labels, -1)
        image_concepts.append(" ".join(c["words"][j] for j in concepts))

        for _ in range(cpi):
            m = int(rng.integers(2, k + 1))
            named = rng.permutation(concepts)[:m]
            length = int(rng.integers(max(_CAPTION_LENGTH[0], m + 2), _CAPTION_LENGTH[1] + 1))
            words = [FILLER_WORDS[j] for j in rng.integers(0, len(FILLER_WORDS), size=length)]
            slots = np.sort(rng.choice(length, size=m, replace=False))
            for slot, concept in zip(slots, named):
                words[slot] = c["words"][concept]
            captions.append(" ".join(words))
    images.flush()
    del images
    np.save(folder / f"{split}_region_concepts.npy", region_concepts)
    _write_lines(folder / f"{split}_caps.txt", captions)
    _write_lines(folder / f"{split}_ids.txt", [str(first_id + i) for i in range(n_images)])
    _write_lines(folder / f"{split}_concepts.txt", image_concepts)


def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")


def _readme(p: dict[str, int]) -> str:
    return (
        "Synthetic image-text matching data written by fastalign.data.generate_synthetic\n"
        f"(seed {p['seed']}). It is NOT a real dataset.\n\n"
        "Same layout as the SCAN / VSE++ / CHAN precomputed-feature folders:\n"
        "  {split}_ims.npy    (n_images, n_regions, feature_dim) float32 region features\n"
        "  {split}_caps.txt   captions, captions_per_image consecutive lines per image\n"
        "  {split}_ids.txt    one image id per line\n"
        "  glove_synthetic.txt  word vectors of every word, GloVe text format\n"
        "Ground truth (not in real data):\n"
        "  {split}_concepts.txt          concept words of each image\n"
        "  {split}_region_concepts.npy   (n_images, n_regions) int16 concept id per region,\n"
        "                                -1 = background\n"
        "  concept_directions.npy        (n_concepts, feature_dim) float32 unit directions\n"
        "Planted structure: see the docstring of fastalign/data/synthetic.py; parameters\n"
        "in meta.json.\n"
    )


def _build(folder: Path, p: dict[str, int]) -> None:
    c = _concepts(p)
    sizes = {"train": p["n_train"], "dev": p["n_val"], "test": p["n_test"]}
    first_id = 0
    for number, split in enumerate(SPLITS, start=1):
        _write_split(folder, split, number, sizes[split], first_id, p, c)
        first_id += sizes[split]
    np.save(folder / "concept_directions.npy", c["directions"])
    vocab_words = list(c["words"]) + list(FILLER_WORDS)
    _write_lines(
        folder / GLOVE_FILE,
        [
            word + " " + " ".join(f"{v:.5f}" for v in vector)
            for word, vector in zip(vocab_words, c["word_vectors"])
        ],
    )
    (folder / "README.txt").write_text(_readme(p), encoding="utf-8")
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir())}
    meta = {
        "generator": _GENERATOR,
        "version": _VERSION,
        "description": "synthetic image-text matching data with planted concepts (not real)",
        "seed": p["seed"],
        "params": p,
        "splits": sizes,
        "concept_words": c["words"],
        "concept_groups": [int(g) for g in c["group_of"]],
        "filler_words": list(FILLER_WORDS),
        "structure": {
            "concepts_per_image": list(_CONCEPTS_PER_IMAGE),
            "foreground_fraction": _FOREGROUND_FRACTION,
            "region_noise_norm": _REGION_NOISE,
            "amplitude": list(_AMPLITUDE),
            "n_clutter_directions": _N_CLUTTER,
            "clutter_weight": _CLUTTER_WEIGHT,
            "style_norm": _STYLE_NORM,
            "global_offset_norm": _OFFSET_NORM,
            "group_size": _GROUP_SIZE,
            "group_weight": _GROUP_WEIGHT,
            "word_vector_correlation": _WORD_CORRELATION,
            "caption_length": list(_CAPTION_LENGTH),
        },
        "files": files,
    }
    text = json.dumps(meta, indent=1, sort_keys=True) + "\n"
    (folder / META_FILE).write_text(text, encoding="utf-8")


def _expected_names() -> set[str]:
    names = {GLOVE_FILE, META_FILE, "README.txt", "concept_directions.npy"}
    for split in SPLITS:
        names |= {
            f"{split}_ims.npy",
            f"{split}_caps.txt",
            f"{split}_ids.txt",
            f"{split}_concepts.txt",
            f"{split}_region_concepts.npy",
        }
    return names


def _read_meta(root: Path) -> dict | None:
    try:
        meta = json.loads((root / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("generator") != _GENERATOR:
        return None
    return meta


def _is_complete(root: Path, p: dict[str, int]) -> bool:
    meta = _read_meta(root)
    if meta is None or meta.get("version") != _VERSION or meta.get("params") != p:
        return False
    files = meta.get("files")
    if not isinstance(files, dict) or not _expected_names() - {META_FILE} <= set(files):
        return False
    for name, size in files.items():
        path = root / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _replaceable(root: Path) -> bool:
    """True when ``root`` may be replaced: empty, or holds only files this module writes."""
    if not root.is_dir():
        return False
    names = {entry.name for entry in root.iterdir()}
    return not names or _read_meta(root) is not None or names <= _expected_names()


def generate_synthetic(
    root: str | os.PathLike,
    seed: int = 0,
    n_train: int = 1000,
    n_val: int = 100,
    n_test: int = 100,
    n_concepts: int = 50,
    n_regions: int = 36,
    feature_dim: int = 2048,
    word_dim: int = 300,
    captions_per_image: int = 5,
) -> Path:
    """Write a synthetic dataset folder (see the module docstring for what it holds).

    Args:
        root: folder to create (replaced if it holds an earlier synthetic dataset).
        seed: the output is a pure function of all arguments.
        n_train, n_val, n_test: images in the ``train``, ``dev`` and ``test`` splits.
        n_concepts: latent concepts (>= 3), each with its own word.
        n_regions: regions per image (R).
        feature_dim: region feature size (F).
        word_dim: word vector size of ``glove_synthetic.txt``.
        captions_per_image: captions per image.

    Returns:
        ``Path(root)``.

    Raises:
        FileExistsError: ``root`` exists and holds something else than synthetic data.
    """
    p = _params(
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        n_concepts=n_concepts,
        n_regions=n_regions,
        feature_dim=feature_dim,
        word_dim=word_dim,
        captions_per_image=captions_per_image,
    )
    root = Path(root)
    if root.exists() and not _replaceable(root):
        raise FileExistsError(
            f"{root} exists and does not look like a synthetic dataset folder; not replacing it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        _build(tmp, p)
        tmp.chmod(0o755)
        _publish(tmp, root, p)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _publish(tmp: Path, root: Path, p: dict[str, int]) -> None:
    try:
        os.rename(tmp, root)  # succeeds when root is absent or an empty folder
        return
    except OSError:
        if not root.is_dir():
            raise
    if _is_complete(root, p):  # another process published the same data meanwhile
        return
    if not _replaceable(root):
        raise FileExistsError(f"{root} exists and does not look like a synthetic dataset folder")
    old = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.old-"))
    os.rename(root, old)  # replaces the empty folder just made
    try:
        os.rename(tmp, root)
    except OSError:
        if not root.exists():
            os.rename(old, root)
        raise
    shutil.rmtree(old, ignore_errors=True)


def ensure_synthetic(root: str | os.PathLike, seed: int = 0, **params: int) -> Path:
    """Return ``root``, generating the synthetic dataset there only if absent or incomplete.

    A folder counts as complete when its ``meta.json`` records the same seed and parameters
    and every file it lists exists with the recorded size.

    Args:
        root: the dataset folder.
        seed: as in :func:`generate_synthetic`.
        **params: any other keyword argument of :func:`generate_synthetic`.
    """
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(generate_synthetic).parameters.items()
        if name not in ("root", "seed")
    }
    unknown = set(params) - set(defaults)
    if unknown:
        raise TypeError(f"ensure_synthetic got unknown parameters: {sorted(unknown)}")
    defaults.update(params)
    p = _params(seed=seed, **defaults)
    root = Path(root)
    if _is_complete(root, p):
        return root
    return generate_synthetic(root, **p)
