"""Synthetic image-text data in the precomputed-feature format, with planted structure.

The generator writes what a real SCAN / VSE++ / CHAN folder holds, so every code path of
real data runs on it, and a model that learns shows it in the recall. Two presets
(:data:`PRESETS`, the one home of every knob below; each is recorded in ``meta.json``):

* ``easy``: the demo; learning is visible within seconds and strong models come close to
  the maximum recall.
* ``hard``: the mechanisms that methods claim to exploit matter and no method saturates:
  strong per-image and per-caption style concentrated in a subset of the feature / word
  vector columns, a large modality gap, images drawn from a few concept "scenes" (near
  duplicates: hard negatives), captions that name only some of their image's concepts,
  synonyms, and held-out concepts that captions name only in the test split.

Planted structure, with the knobs that control it:

* ``n_concepts`` latent concepts, each with a unit direction in feature space and one to
  ``synonyms[1]`` made-up pronounceable words (``"bako"``, ``"temiru"``, ...; the number of
  words of a concept is drawn uniformly from ``synonyms``, a (min, max) pair). Concepts come
  in groups of about ``group_size`` whose directions share a component of weight
  ``group_weight`` (cosine ~0.36 within a group at 0.6), like visually similar classes.
* Scenes: with ``n_scenes`` > 0, each image first draws one of ``n_scenes`` scenes, each a
  fixed random set of ``scene_size`` concepts, and takes ``round(scene_share * k)`` of its
  ``k`` concepts from its scene (the rest from outside), so images of the same scene share
  most of their concepts. With ``n_scenes`` = 0 an image's concepts are drawn uniformly.
* An image holds ``concepts_per_image`` (min, max) concepts. A fraction
  ``foreground_fraction`` of its ``n_regions`` regions are noisy views of them (two or more
  regions per concept when there is room): ``amplitude * direction + noise`` with the
  amplitude uniform in ``amplitude`` and the noise of norm ``region_noise``; the others are
  background clutter (``n_clutter`` directions not named by any word, amplitude scaled by
  ``clutter_weight``).
* Every region of an image carries the image's own random style offset of norm
  ``style_norm``, confined to a fixed random subset of ``round(style_fraction *
  feature_dim)`` feature columns (1.0 = spread over all columns), and all images share a
  global offset of norm ``offset_norm`` (the modality gap).
* Each image has ``captions_per_image`` captions; each names ``m`` of the image's concepts,
  ``m`` uniform in [``named_min``, max(``named_min``, round(``named_max_fraction`` * k))]
  (fewer when the image has fewer nameable concepts), in random order, each by one of its
  words drawn at random, among filler words ("a", "the", "with", "near", ...); the caption
  is ``caption_length`` (min, max) words long. A number of its filler words, uniform in
  ``style_words_per_caption`` (min, max), are replaced by words drawn from a vocabulary of
  ``n_style_words`` style words (the caption's style).
* Held-out concepts: ``n_heldout`` concepts (drawn at random) appear in the images of
  every split but are named only in test captions (never in train or dev captions), so
  their words are out of a vocabulary built from the training captions and absent from the
  knowledge folder; their word vectors are in ``glove_synthetic.txt``.
* ``glove_synthetic.txt`` holds word vectors (GloVe text format, ``word_dim``-d) of every
  word: concept words (held-out ones included), filler words, synonyms and style words. A
  concept's vector is correlated (cosine ``word_correlation``) with a fixed random
  projection of its direction, so vectors of concepts in the same group are similar and
  initialising word embeddings from them helps; its components have standard deviation
  ``word_component_std``. A synonym's vector has cosine ~``synonym_correlation`` with its
  concept's first word. Style word vectors have norm ``word_style_norm`` times a concept
  vector's, confined to a fixed random subset of ``round(word_style_fraction * word_dim)``
  columns. Every word vector is shifted by a common offset of norm ``word_offset_norm``
  times a concept vector's norm.
* Knowledge (for unpaired word-region methods such as MASK / MACK): ``knowledge/`` holds
  ``regions.npy`` (n_pairs, feature_dim) float16 and ``words.txt`` (the word of each row),
  built from the train split's ground-truth region labels: for every train image and every
  one of its concepts except the held-out ones, ``knowledge_regions_per_concept`` of the
  regions labelled with the concept, each named by one of the concept's words drawn at
  random. The word vectors of the knowledge are those of ``glove_synthetic.txt``.

Files written (for split in train, dev, test): ``{split}_ims.npy`` (n, R, F) float32,
``{split}_caps.txt``, ``{split}_ids.txt`` (one id per image), ``glove_synthetic.txt``,
``knowledge/regions.npy``, ``knowledge/words.txt``, plus ground truth that real data lacks:
``{split}_concepts.txt`` (the concept words (first word of each concept) of each image),
``{split}_region_concepts.npy`` (n, R) int16 (concept id of each region, -1 =
background), ``concept_directions.npy`` (n_concepts, F) float32, ``meta.json`` and
``README.txt``. ``meta.json`` records the preset, the seed, every knob, the words of each
concept, the held-out concepts, the style words, the scenes, the style columns (null = all
columns) and the size of every file.

Output is a pure function of the preset, the seed and the knobs (same bytes for the same
arguments; ``easy`` writes the same data files as the generator did before the presets),
and the folder appears atomically: it is generated in a temporary sibling folder, then
renamed. :func:`synthetic_folder` names a folder by what generates it, and
:func:`ensure_synthetic` generates into that folder only when it is absent or incomplete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fastalign._files import DISK_ERRORS, write_error

SPLITS = ("train", "dev", "test")
GLOVE_FILE = "glove_synthetic.txt"
META_FILE = "meta.json"
KNOWLEDGE_DIR = "knowledge"
KNOWLEDGE_REGIONS = "regions.npy"
KNOWLEDGE_WORDS = "words.txt"
_GENERATOR = "fastalign.synthetic"
_VERSION = 2

FILLER_WORDS = (
    "a", "an", "the", "with", "near", "and", "of", "on", "in", "some", "two", "is",
    "are", "next", "to", "by", "beside", "under", "there", "photo", "picture", "showing",
    "while", "at",
)  # fmt: skip

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)

SIZE_KNOBS = (
    "n_train",
    "n_val",
    "n_test",
    "n_concepts",
    "n_regions",
    "feature_dim",
    "word_dim",
    "captions_per_image",
)

_EASY: dict[str, Any] = dict(
    # sizes
    n_train=1000,
    n_val=100,
    n_test=100,
    n_concepts=50,
    n_regions=36,
    feature_dim=2048,
    word_dim=300,
    captions_per_image=5,
    # concepts and images
    group_size=5,
    group_weight=0.6,
    concepts_per_image=(3, 6),
    foreground_fraction=0.6,
    region_noise=0.8,
    amplitude=(0.7, 1.3),
    n_clutter=10,
    clutter_weight=0.6,
    n_scenes=0,
    scene_size=0,
    scene_share=0.0,
    # style and modality gap
    style_norm=0.6,
    style_fraction=1.0,
    offset_norm=0.5,
    # captions
    caption_length=(6, 20),
    named_min=2,
    named_max_fraction=1.0,
    synonyms=(1, 1),
    n_heldout=0,
    n_style_words=0,
    style_words_per_caption=(0, 0),
    # word vectors
    word_correlation=0.8,
    word_component_std=0.4,
    synonym_correlation=0.7,
    word_style_norm=0.0,
    word_style_fraction=1.0,
    word_offset_norm=0.0,
    # knowledge
    knowledge_regions_per_concept=1,
)

_HARD: dict[str, Any] = dict(
    _EASY,
    n_train=1000,
    n_val=100,
    # 500 test images (2500 captions): with 200, LAPS's test rSum was 559 of 600 (seeds 0-2)
    # and CHAN's 452; with 500, LAPS 525 and CHAN 323 (seeds 0-1), in the calibrated range.
    n_test=500,
    n_concepts=80,
    n_clutter=20,
    # 100 scenes: about 10 train images each, so that a batch of 128 seldom holds two images
    # of one scene whose captions fit both (false negatives); with 40 scenes and 1000 train
    # images LAPS's hardest-negative training collapsed (test rSum 56 on seed 0).
    n_scenes=100,
    scene_size=8,
    scene_share=0.6,
    region_noise=1.0,
    style_norm=3.0,
    style_fraction=0.1,
    offset_norm=3.0,
    named_min=2,
    named_max_fraction=0.8,
    synonyms=(1, 3),
    n_heldout=6,
    n_style_words=20,
    style_words_per_caption=(1, 3),
    # Calibrated with CHAN in a one-minute budget (6 epochs, 2 cores; 200 test images then):
    # style words of norm 2 with a word offset of 0.5 collapsed hardest-negative training
    # (test rSum 72 of 600); offset 0.5 -> 0.375 -> 0.25 (style 1.0) gave CHAN about
    # 150 -> 236 -> 500, with a large spread over seeds above 0.3.
    word_style_norm=1.0,
    word_style_fraction=0.1,
    word_offset_norm=0.3,
)

GENERATOR_VERSION = 1
"""Raised whenever the generator writes other data for the same knobs; part of every
synthetic folder's name, so that data of an older generator is never mistaken for today's."""

PRESETS: dict[str, dict[str, Any]] = {"easy": _EASY, "hard": _HARD}
"""Preset name -> the value of every knob (see the module docstring for their meaning)."""

_INT_MINIMUM = dict(
    n_train=1,
    n_val=1,
    n_test=1,
    n_concepts=3,
    n_regions=3,
    feature_dim=2,
    word_dim=1,
    captions_per_image=1,
    group_size=1,
    n_clutter=1,
    n_scenes=0,
    scene_size=0,
    named_min=1,
    n_heldout=0,
    n_style_words=0,
    knowledge_regions_per_concept=0,
)
_FRACTIONS = (
    "group_weight",
    "foreground_fraction",
    "scene_share",
    "style_fraction",
    "named_max_fraction",
    "word_correlation",
    "synonym_correlation",
    "word_style_fraction",
)


def preset_names() -> tuple[str, ...]:
    """The names of the presets, in :data:`PRESETS` order."""
    return tuple(PRESETS)


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


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    high = 1.0 if name in _FRACTIONS else math.inf
    if not 0.0 <= value <= high:
        raise ValueError(f"{name} must lie in [0, {high}], got {value!r}")
    return value


def _check_pair(name: str, value: Any, kind: type) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    if kind is int:
        pair = [_check_int(name, v, 0) for v in value]
    else:
        pair = [_check_float(name, v) for v in value]
    if pair[0] > pair[1]:
        raise ValueError(f"{name} must be a (min, max) pair with min <= max, got {value!r}")
    return pair


def _check_preset(preset: Any) -> str:
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; presets: {', '.join(PRESETS)}")
    return preset


def resolve_params(preset: str = "easy", seed: int = 0, **knobs: Any) -> dict[str, Any]:
    """The full, checked knob values of ``preset`` with ``knobs`` (None = the preset's value).

    Returns:
        ``{"preset": ..., "seed": ..., <every knob>: ...}`` with (min, max) pairs as lists,
        the form ``meta.json`` records.

    Raises:
        ValueError: unknown preset or a knob value out of its range.
        TypeError: a knob that no preset has.
    """
    defaults = PRESETS[_check_preset(preset)]
    unknown = set(knobs) - set(defaults)
    if unknown:
        raise TypeError(
            f"unknown synthetic data parameters: {sorted(unknown)}; known: {sorted(defaults)}"
        )
    p: dict[str, Any] = {"preset": preset, "seed": _check_int("seed", seed, 0)}
    for name, default in defaults.items():
        value = knobs.get(name)
        if value is None:
            value = default
        if name in _INT_MINIMUM:
            p[name] = _check_int(name, value, _INT_MINIMUM[name])
        elif isinstance(default, tuple):
            p[name] = _check_pair(name, value, type(default[0]))
        else:
            p[name] = _check_float(name, value)
    if p["synonyms"][0] < 1:
        raise ValueError(f"synonyms must be >= 1 word per concept, got {p['synonyms']}")
    if p["n_heldout"] > p["n_concepts"] - 2:
        raise ValueError(f"n_heldout must leave >= 2 named concepts, got {p['n_heldout']}")
    if p["n_scenes"] and not 1 <= p["scene_size"] <= p["n_concepts"]:
        raise ValueError(f"scene_size must lie in [1, n_concepts], got {p['scene_size']}")
    if p["style_words_per_caption"][1] and not p["n_style_words"]:
        raise ValueError("style_words_per_caption > 0 needs n_style_words > 0")
    return p


def synthetic_folder(base: str | os.PathLike, preset: str = "easy", seed: int = 0, **knobs) -> Path:
    """The folder, under ``base``, named by what generates the data.

    ``base / f"{preset}-seed{seed}-{n_train}x{n_val}x{n_test}-{digest}"``, where ``digest``
    is 8 hex digits of every other knob's value and of :data:`GENERATOR_VERSION`: two
    different datasets never share a folder, also when a preset's values or the generator
    change between releases (an older folder is then left alone, not reused).

    Args:
        base: the folder that holds synthetic datasets (e.g. ``.data/synthetic``).
        preset, seed, **knobs: as in :func:`generate_synthetic` (None = the preset's value).
    """
    p = resolve_params(preset, seed, **knobs)
    name = f"{preset}-seed{p['seed']}-{p['n_train']}x{p['n_val']}x{p['n_test']}"
    identity = {k: v for k, v in p.items() if k not in ("seed", "n_train", "n_val", "n_test")}
    identity["generator_version"] = GENERATOR_VERSION
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return Path(base) / f"{name}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------


def _column_mask(rng: np.random.Generator, dim: int, fraction: float) -> np.ndarray | None:
    """A random 0/1 mask of ``round(fraction * dim)`` (>= 1) columns; None for all columns."""
    if fraction >= 1.0:
        return None
    mask = np.zeros(dim)
    mask[rng.choice(dim, size=max(1, round(fraction * dim)), replace=False)] = 1.0
    return mask


def _masked_unit(z: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return _unit_rows(z if mask is None else z * mask)


def _concepts(p: dict[str, Any]) -> dict[str, Any]:
    # The stream of rng below is the generator's from before the presets (easy's bytes);
    # everything that only other presets use comes from ``extra``.
    rng = np.random.default_rng([p["seed"], 0])
    extra = np.random.default_rng([p["seed"], 0, 1])
    n, dim = p["n_concepts"], p["feature_dim"]
    n_groups = max(1, round(n / p["group_size"]))
    group_of = rng.permutation(np.arange(n) % n_groups)
    groups = _unit_rows(rng.standard_normal((n_groups, dim)))
    own = _unit_rows(rng.standard_normal((n, dim)))
    group_weight = p["group_weight"]
    mix = math.sqrt(1.0 - group_weight**2)
    directions = _unit_rows(group_weight * groups[group_of] + mix * own).astype(np.float32)
    clutter = _unit_rows(rng.standard_normal((p["n_clutter"], dim))).astype(np.float32)
    offset = (p["offset_norm"] * _unit_rows(rng.standard_normal(dim))).astype(np.float32)

    # words: each concept's first word, then (in later positions) synonyms and style words
    n_synonyms = extra.integers(p["synonyms"][0], p["synonyms"][1] + 1, size=n)
    n_words = n + int((n_synonyms - 1).sum()) + p["n_style_words"]
    taken = set(FILLER_WORDS)
    index = 0

    def next_word(size: int) -> str:
        nonlocal index
        while True:
            word = concept_word(index, size)
            index += 1
            if word not in taken:
                taken.add(word)
                return word

    words = [next_word(n) for _ in range(n)]
    synonyms = [[w] for w in words]
    for k in range(n):
        synonyms[k] += [next_word(max(n, n_words)) for _ in range(n_synonyms[k] - 1)]
    style_words = [next_word(max(n, n_words)) for _ in range(p["n_style_words"])]

    # word vectors: correlated with a fixed random projection of each concept's direction
    wdim = p["word_dim"]
    projection = rng.standard_normal((wdim, dim)) / math.sqrt(dim)
    projected = np.stack([(projection * d.astype(np.float64)).sum(axis=1) for d in directions])
    noise = rng.standard_normal((n, wdim))
    if wdim > 1:
        projected = _unit_rows(projected)
        noise = _unit_rows(noise)
    corr = p["word_correlation"]
    concept_vectors = corr * projected + math.sqrt(1.0 - corr**2) * noise
    if wdim > 1:
        concept_vectors = _unit_rows(concept_vectors)
    filler_vectors = rng.standard_normal((len(FILLER_WORDS), wdim))
    if wdim > 1:
        filler_vectors = _unit_rows(filler_vectors)
    vectors = [concept_vectors, filler_vectors]
    extra_words: list[str] = []
    rho = p["synonym_correlation"]
    for k in range(n):
        for word in synonyms[k][1:]:
            z = extra.standard_normal(wdim)
            if wdim > 1:
                z = _unit_rows(rho * concept_vectors[k] + math.sqrt(1.0 - rho**2) * _unit_rows(z))
            vectors.append(z[None])
            extra_words.append(word)
    word_style_mask = None
    if style_words:
        word_style_mask = _column_mask(extra, wdim, p["word_style_fraction"])
        z = extra.standard_normal((len(style_words), wdim))
        z = _masked_unit(z, word_style_mask) if wdim > 1 else z
        vectors.append(p["word_style_norm"] * z)
        extra_words += style_words
    scale = p["word_component_std"] * math.sqrt(wdim)
    word_vectors = np.concatenate(vectors) * scale
    if p["word_offset_norm"]:
        word_vectors += p["word_offset_norm"] * scale * _unit_rows(extra.standard_normal(wdim))

    # held-out concepts, scenes, the columns of the image style
    heldout = np.sort(extra.choice(n, size=p["n_heldout"], replace=False))
    scenes = [
        np.sort(extra.choice(n, size=p["scene_size"], replace=False)) for _ in range(p["n_scenes"])
    ]
    style_mask = _column_mask(extra, dim, p["style_fraction"])
    return dict(
        directions=directions,
        group_of=group_of,
        clutter=clutter,
        offset=offset,
        words=words,
        synonyms=synonyms,
        style_words=style_words,
        vocabulary=list(words) + list(FILLER_WORDS) + extra_words,
        word_vectors=word_vectors,
        heldout=heldout,
        scenes=scenes,
        style_mask=style_mask,
        word_style_mask=word_style_mask,
    )


def _image_concepts(rng: np.random.Generator, k: int, p: dict[str, Any], c: dict) -> np.ndarray:
    n_concepts = p["n_concepts"]
    if not c["scenes"]:
        return np.sort(rng.choice(n_concepts, size=k, replace=False))
    scene = c["scenes"][int(rng.integers(0, len(c["scenes"])))]
    inside = min(k, len(scene), round(p["scene_share"] * k))
    outside = np.setdiff1d(np.arange(n_concepts), scene)
    inside = max(inside, k - len(outside))
    chosen = [rng.choice(scene, size=inside, replace=False)]
    chosen.append(rng.choice(outside, size=k - inside, replace=False))
    return np.sort(np.concatenate(chosen))


def _write_split(
    folder: Path, split: str, split_number: int, n_images: int, first_id: int, p: dict, c: dict
) -> None:
    rng = np.random.default_rng([p["seed"], split_number])
    n_regions, dim, cpi = p["n_regions"], p["feature_dim"], p["captions_per_image"]
    n_concepts, n_clutter = p["n_concepts"], p["n_clutter"]
    directions = np.concatenate([c["directions"], c["clutter"]])  # clutter ids = n_concepts..
    images = np.lib.format.open_memmap(
        folder / f"{split}_ims.npy", mode="w+", dtype=np.float32, shape=(n_images, n_regions, dim)
    )
    region_concepts = np.empty((n_images, n_regions), dtype=np.int16)
    captions, image_concepts = [], []
    noise_scale = np.float32(p["region_noise"] / math.sqrt(dim))
    low, high = p["concepts_per_image"]
    min_length, max_length = p["caption_length"]
    nameable = np.ones(n_concepts, dtype=bool)
    if split != "test":
        nameable[c["heldout"]] = False
    style_low, style_high = p["style_words_per_caption"]
    for i in range(n_images):
        k = max(1, min(int(rng.integers(low, high + 1)), n_concepts, n_regions))
        concepts = _image_concepts(rng, k, p, c)
        n_fg = min(n_regions, max(k, round(p["foreground_fraction"] * n_regions)))
        per_concept = 2 if n_fg >= 2 * k else 1
        labels = np.concatenate(
            [
                np.repeat(concepts, per_concept),
                rng.choice(concepts, size=n_fg - per_concept * k),
                n_concepts + rng.integers(0, n_clutter, size=n_regions - n_fg),
            ]
        )
        labels = rng.permutation(labels)
        amplitude = rng.uniform(*p["amplitude"], size=n_regions).astype(np.float32)
        amplitude[labels >= n_concepts] *= np.float32(p["clutter_weight"])
        style = _masked_unit(rng.standard_normal(dim), c["style_mask"])
        style = (p["style_norm"] * style).astype(np.float32)
        noise = rng.standard_normal((n_regions, dim), dtype=np.float32) * noise_scale
        images[i] = amplitude[:, None] * directions[labels] + noise + (style + c["offset"])
        region_concepts[i] = np.where(labels < n_concepts, labels, -1)
        image_concepts.append(" ".join(c["words"][j] for j in concepts))

        candidates = concepts[nameable[concepts]]
        most = max(p["named_min"], round(p["named_max_fraction"] * k))
        for _ in range(cpi):
            m = min(int(rng.integers(p["named_min"], most + 1)), len(candidates))
            named = rng.permutation(candidates)[:m]
            length = int(rng.integers(max(min_length, m + 2), max_length + 1))
            words = [FILLER_WORDS[j] for j in rng.integers(0, len(FILLER_WORDS), size=length)]
            slots = np.sort(rng.choice(length, size=m, replace=False))
            for slot, concept in zip(slots, named):
                choices = c["synonyms"][concept]
                pick = int(rng.integers(0, len(choices))) if len(choices) > 1 else 0
                words[slot] = choices[pick]
            if style_high:
                free = np.setdiff1d(np.arange(length), slots)
                n_style = min(int(rng.integers(style_low, style_high + 1)), len(free))
                for slot in rng.choice(free, size=n_style, replace=False):
                    words[slot] = c["style_words"][int(rng.integers(0, len(c["style_words"])))]
            captions.append(" ".join(words))
    images.flush()
    del images
    np.save(folder / f"{split}_region_concepts.npy", region_concepts)
    _write_lines(folder / f"{split}_caps.txt", captions)
    _write_lines(folder / f"{split}_ids.txt", [str(first_id + i) for i in range(n_images)])
    _write_lines(folder / f"{split}_concepts.txt", image_concepts)


def _write_knowledge(folder: Path, p: dict[str, Any], c: dict) -> dict[str, Any]:
    """Write ``knowledge/`` from the train split's ground-truth region labels."""
    rng = np.random.default_rng([p["seed"], 0, 2])
    images = np.load(folder / "train_ims.npy", mmap_mode="r")
    labels = np.load(folder / "train_region_concepts.npy")
    excluded = np.zeros(p["n_concepts"] + 1, dtype=bool)  # last entry: background (-1)
    excluded[c["heldout"]] = True
    excluded[-1] = True
    per_concept = p["knowledge_regions_per_concept"]
    rows: list[tuple[int, int]] = []
    words: list[str] = []
    for i in range(labels.shape[0]):
        for concept in np.unique(labels[i]):
            if excluded[concept]:
                continue
            for r in np.flatnonzero(labels[i] == concept)[:per_concept]:
                rows.append((i, int(r)))
                choices = c["synonyms"][concept]
                words.append(choices[int(rng.integers(0, len(choices)))])
    out = folder / KNOWLEDGE_DIR
    out.mkdir()
    regions = np.lib.format.open_memmap(
        out / KNOWLEDGE_REGIONS, mode="w+", dtype=np.float16, shape=(len(rows), p["feature_dim"])
    )
    for start in range(0, len(rows), 4096):
        chunk = np.array(rows[start : start + 4096], dtype=np.int64).reshape(-1, 2)
        regions[start : start + len(chunk)] = images[chunk[:, 0], chunk[:, 1]]
    regions.flush()
    del regions
    _write_lines(out / KNOWLEDGE_WORDS, words)
    return {
        "folder": KNOWLEDGE_DIR,
        "regions": f"{KNOWLEDGE_DIR}/{KNOWLEDGE_REGIONS}",
        "words": f"{KNOWLEDGE_DIR}/{KNOWLEDGE_WORDS}",
        "word_vectors": GLOVE_FILE,
        "n_pairs": len(rows),
        "n_words": len(set(words)),
        "dtype": "float16",
        "source": "train split, ground-truth region labels",
        "regions_per_concept": per_concept,
        "excluded_concepts": [c["words"][j] for j in c["heldout"]],
    }


def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")


def _readme(p: dict[str, Any]) -> str:
    return (
        "Synthetic image-text matching data written by fastalign.data.generate_synthetic\n"
        f"(preset {p['preset']}, seed {p['seed']}). It is NOT a real dataset.\n\n"
        "Same layout as the SCAN / VSE++ / CHAN precomputed-feature folders:\n"
        "  {split}_ims.npy    (n_images, n_regions, feature_dim) float32 region features\n"
        "  {split}_caps.txt   captions, captions_per_image consecutive lines per image\n"
        "  {split}_ids.txt    one image id per line\n"
        "  glove_synthetic.txt  word vectors of every word, GloVe text format (this includes\n"
        "                       the words of held-out concepts, which no train or dev\n"
        "                       caption and no knowledge row uses)\n"
        "Knowledge (word-region pairs, as MASK / MACK use; train split only):\n"
        "  knowledge/regions.npy  (n_pairs, feature_dim) float16 region features\n"
        "  knowledge/words.txt    the word of each row; word vectors: glove_synthetic.txt\n"
        "Ground truth (not in real data):\n"
        "  {split}_concepts.txt          concept words of each image\n"
        "  {split}_region_concepts.npy   (n_images, n_regions) int16 concept id per region,\n"
        "                                -1 = background\n"
        "  concept_directions.npy        (n_concepts, feature_dim) float32 unit directions\n"
        "Planted structure: see the docstring of fastalign/data/synthetic.py; every knob\n"
        "in meta.json.\n"
    )


def _list_files(folder: Path) -> dict[str, int]:
    return {
        f.relative_to(folder).as_posix(): f.stat().st_size
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def _build(folder: Path, p: dict[str, Any]) -> None:
    c = _concepts(p)
    sizes = {"train": p["n_train"], "dev": p["n_val"], "test": p["n_test"]}
    first_id = 0
    for number, split in enumerate(SPLITS, start=1):
        _write_split(folder, split, number, sizes[split], first_id, p, c)
        first_id += sizes[split]
    np.save(folder / "concept_directions.npy", c["directions"])
    _write_lines(
        folder / GLOVE_FILE,
        [
            word + " " + " ".join(f"{v:.5f}" for v in vector)
            for word, vector in zip(c["vocabulary"], c["word_vectors"])
        ],
    )
    knowledge = _write_knowledge(folder, p, c)
    (folder / "README.txt").write_text(_readme(p), encoding="utf-8")
    meta = {
        "generator": _GENERATOR,
        "version": _VERSION,
        "description": "synthetic image-text matching data with planted concepts (not real)",
        "preset": p["preset"],
        "seed": p["seed"],
        "params": p,
        "splits": sizes,
        "concept_words": c["words"],
        "concept_synonyms": c["synonyms"],
        "concept_groups": [int(g) for g in c["group_of"]],
        "heldout_concepts": [c["words"][j] for j in c["heldout"]],
        "scenes": [[c["words"][j] for j in scene] for scene in c["scenes"]],
        "style_words": c["style_words"],
        "style_columns": _columns(c["style_mask"]),
        "word_style_columns": _columns(c["word_style_mask"]),
        "filler_words": list(FILLER_WORDS),
        "knowledge": knowledge,
        "files": _list_files(folder),
    }
    text = json.dumps(meta, indent=1, sort_keys=True) + "\n"
    (folder / META_FILE).write_text(text, encoding="utf-8")


def _columns(mask: np.ndarray | None) -> list[int] | None:
    """The columns of a mask (None = all columns)."""
    return None if mask is None else [int(j) for j in np.flatnonzero(mask)]


def _expected_names() -> set[str]:
    names = {GLOVE_FILE, META_FILE, "README.txt", "concept_directions.npy"}
    names |= {f"{KNOWLEDGE_DIR}/{KNOWLEDGE_REGIONS}", f"{KNOWLEDGE_DIR}/{KNOWLEDGE_WORDS}"}
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


def _same_data(meta: dict | None, p: dict[str, Any]) -> bool:
    return meta is not None and meta.get("version") == _VERSION and meta.get("params") == p


def _is_complete(root: Path, p: dict[str, Any]) -> bool:
    meta = _read_meta(root)
    if not _same_data(meta, p):
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
    top = {name.split("/")[0] for name in _expected_names()}
    return not names or _read_meta(root) is not None or names <= top


def generate_synthetic(
    root: str | os.PathLike,
    preset: str = "easy",
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    n_concepts: int | None = None,
    n_regions: int | None = None,
    feature_dim: int | None = None,
    word_dim: int | None = None,
    captions_per_image: int | None = None,
    **knobs: Any,
) -> Path:
    """Write a synthetic dataset folder (see the module docstring for what it holds).

    Args:
        root: folder to create (replaced if it holds an earlier synthetic dataset).
        preset: ``"easy"`` or ``"hard"`` (:data:`PRESETS`): the value of every knob not given.
        seed: the output is a pure function of the preset, the seed and the knobs.
        n_train, n_val, n_test: images in the ``train``, ``dev`` and ``test`` splits.
        n_concepts: latent concepts (>= 3).
        n_regions: regions per image (R).
        feature_dim: region feature size (F).
        word_dim: word vector size of ``glove_synthetic.txt``.
        captions_per_image: captions per image.
        **knobs: any other knob of :data:`PRESETS` (see the module docstring).
            None (every size's default) means the preset's value.

    Returns:
        ``Path(root)``.

    Raises:
        ValueError: unknown preset (the message lists the presets) or a bad knob value.
        TypeError: unknown knob.
        FileExistsError: ``root`` exists and holds something else than synthetic data.
    """
    p = resolve_params(
        preset,
        seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        n_concepts=n_concepts,
        n_regions=n_regions,
        feature_dim=feature_dim,
        word_dim=word_dim,
        captions_per_image=captions_per_image,
        **knobs,
    )
    return _generate(Path(root), p)


def _generate(root: Path, p: dict[str, Any]) -> Path:
    if root.exists() and not _replaceable(root):
        raise FileExistsError(
            f"{root} exists and does not look like a synthetic dataset folder; not replacing it"
        )
    tmp = None
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
        _build(tmp, p)
        tmp.chmod(0o755)
        _publish(tmp, root, p)
    except OSError as exc:
        # Name the folder asked for, not the temporary one the error is about.
        if exc.errno in DISK_ERRORS:
            raise write_error(root, exc, "write the synthetic dataset") from exc
        raise
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _publish(tmp: Path, root: Path, p: dict[str, Any]) -> None:
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


def ensure_synthetic(
    base: str | os.PathLike, preset: str = "easy", seed: int = 0, **knobs: Any
) -> Path:
    """The synthetic dataset of ``preset``, ``seed`` and ``knobs``, generated if need be.

    The data lives in ``synthetic_folder(base, preset, seed, **knobs)`` (a folder named by
    what generates it). It is generated there when that folder is absent, empty or
    incomplete (a file that ``meta.json`` lists is missing or has another size); a complete
    folder is returned as it is.

    Args:
        base: the folder that holds synthetic datasets (e.g. ``.data/synthetic``).
        preset, seed, **knobs: as in :func:`generate_synthetic` (None = the preset's value).

    Returns:
        The dataset folder.

    Raises:
        FileExistsError: the folder holds another dataset (other knobs or generator
            version) or files this module does not write; it is never replaced.
    """
    p = resolve_params(preset, seed, **knobs)
    root = synthetic_folder(base, preset, seed, **knobs)
    if _is_complete(root, p):
        return root
    if root.exists():
        meta = _read_meta(root)
        if meta is not None and not _same_data(meta, p):
            raise FileExistsError(
                f"{root} holds another synthetic dataset (its meta.json records other "
                "parameters or generator version); remove it or use another base folder"
            )
    return _generate(root, p)
