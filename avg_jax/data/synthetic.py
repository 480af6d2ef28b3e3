"""The built-in SYNTHETIC benchmark: compositional scenes, a fixed random "visual encoder", captions.

Nothing here is a real photo or a real encoder. A scene is 1-3 object groups (count, size, colour,
shape, position) plus an optional spatial relation. Image features come from a fixed random
two-layer network over the scene's symbolic encoding plus per-image nuisance factors (lighting,
background) and noise; text features come from a *separate* fixed random network over the caption's
word and bigram hashes. Scenes are generated in families of near-duplicates (one attribute changed)
so retrieval is not trivial. Test images' captions are never training queries and never equal a
training caption string. Everything is deterministic from the seed.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib

import gin
import numpy as np

from avg_jax.data.corpus import Corpus, ImageRecord, QueryRecord, normalize_rows

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond")
SIZES = ("small", "medium", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left of", "right of", "above", "below", "next to")
COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three", "a group of three")}
POSITION_PHRASES = {
    "left": ("on the left", "at the left side", "to the left"),
    "right": ("on the right", "at the right side", "to the right"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "centre": ("in the centre", "in the middle", "at the center"),
}
OPENERS = ("", "a picture of ", "an image showing ", "there is ", "we can see ", "a scene with ")
NUISANCE_DIM = 16


@dataclasses.dataclass(frozen=True)
class Group:
    count: int
    size: int
    colour: int
    shape: int
    position: int


@dataclasses.dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]
    relation: int | None  # relation of group 0 to group 1, when there are >= 2 groups


def _random_group(rng: np.random.Generator) -> Group:
    return Group(count=int(rng.integers(1, 4)), size=int(rng.integers(len(SIZES))),
                 colour=int(rng.integers(len(COLOURS))), shape=int(rng.integers(len(SHAPES))),
                 position=int(rng.integers(len(POSITIONS))))


def _random_scene(rng: np.random.Generator) -> Scene:
    groups = tuple(_random_group(rng) for _ in range(int(rng.integers(1, 4))))
    relation = int(rng.integers(len(RELATIONS))) if len(groups) >= 2 and rng.random() < 0.6 else None
    return Scene(groups, relation)


def _perturb(scene: Scene, rng: np.random.Generator) -> Scene:
    """A near-duplicate: one attribute of one group changed."""
    g_idx = int(rng.integers(len(scene.groups)))
    g = scene.groups[g_idx]
    field, n = [("colour", len(COLOURS)), ("shape", len(SHAPES)), ("size", len(SIZES)),
                ("position", len(POSITIONS)), ("count", 3)][int(rng.integers(5))]
    old = getattr(g, field) - (1 if field == "count" else 0)
    new = (old + int(rng.integers(1, n))) % n + (1 if field == "count" else 0)
    groups = list(scene.groups)
    groups[g_idx] = dataclasses.replace(g, **{field: new})
    return Scene(tuple(groups), scene.relation)


def _symbolic(scene: Scene) -> np.ndarray:
    """Bag of (attribute, value) and (shape, colour), (shape, position) conjunctions, count-weighted."""
    parts = [len(COLOURS), len(SHAPES), len(SIZES), len(POSITIONS), 3,
             len(SHAPES) * len(COLOURS), len(SHAPES) * len(POSITIONS), len(RELATIONS)]
    offsets = np.concatenate([[0], np.cumsum(parts)])
    x = np.zeros(offsets[-1], np.float32)
    for g in scene.groups:
        w = 1.0 + 0.25 * (g.count - 1) + 0.25 * g.size
        for k, v in enumerate((g.colour, g.shape, g.size, g.position, g.count - 1,
                               g.shape * len(COLOURS) + g.colour, g.shape * len(POSITIONS) + g.position)):
            x[offsets[k] + v] += w
    if scene.relation is not None:
        x[offsets[7] + scene.relation] += 1.0
    return x


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def _group_phrase(g: Group, rng: np.random.Generator, detail: float) -> str:
    words = [str(rng.choice(COUNT_WORDS[g.count]))]
    if rng.random() < detail:
        words.append(SIZES[g.size])
    if rng.random() < max(detail, 0.7):
        words.append(COLOURS[g.colour])
    words.append(_plural(SHAPES[g.shape]) if g.count > 1 else SHAPES[g.shape])
    if rng.random() < detail:
        words.append(str(rng.choice(POSITION_PHRASES[POSITIONS[g.position]])))
    return " ".join(words)


def _caption(scene: Scene, rng: np.random.Generator, detail: float) -> str:
    """One paraphrase mentioning a random subset of the scene."""
    groups = list(scene.groups)
    if scene.relation is not None and rng.random() < 0.5:
        a, b = _group_phrase(groups[0], rng, detail), _group_phrase(groups[1], rng, detail)
        body = f"{a} {RELATIONS[scene.relation]} {b}"
    else:
        k = int(rng.integers(1, len(groups) + 1))
        chosen = [groups[i] for i in sorted(rng.choice(len(groups), size=k, replace=False))]
        phrases = [_group_phrase(g, rng, detail) for g in chosen]
        body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return (str(rng.choice(OPENERS)) + body).strip()


def _hash_vector(token: str, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng([zlib.crc32(token.encode()), seed]).standard_normal(dim).astype(np.float32)


class _RandomNet:
    """A fixed random two-layer tanh network: the stand-in for a pretrained encoder."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, rng: np.random.Generator):
        self.w1 = rng.standard_normal((in_dim, hidden)).astype(np.float32) / np.sqrt(in_dim)
        self.w2 = rng.standard_normal((hidden, out_dim)).astype(np.float32) / np.sqrt(hidden)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ self.w1) @ self.w2


def text_features(captions: list[str], dim: int, seed: int) -> np.ndarray:
    """The synthetic text encoder: hashed word + bigram embeddings through a fixed random network."""
    rng = np.random.default_rng([seed, 2])
    net = _RandomNet(dim, 2 * dim, dim, rng)
    cache: dict[str, np.ndarray] = {}

    def vec(tok: str) -> np.ndarray:
        if tok not in cache:
            cache[tok] = _hash_vector(tok, dim, seed)
        return cache[tok]

    bags = np.zeros((len(captions), dim), np.float32)
    for i, caption in enumerate(captions):
        words = caption.lower().replace(",", " ").split()
        toks = words + [f"{a}_{b}" for a, b in itertools.pairwise(words)]
        bags[i] = np.mean([vec(t) for t in toks], axis=0)
    return normalize_rows(net(bags * np.sqrt(dim)))


@gin.configurable(denylist=["seed"])
def make_synthetic_corpus(
    seed: int = 0,
    num_images: int = 5000,
    captions_per_image: int = 5,
    num_val: int = 250,
    num_test: int = 500,
    family_size: int = 3,
    image_dim: int = 256,
    text_dim: int = 256,
    nuisance: float = 0.35,
    noise: float = 0.05,
) -> Corpus:
    """Build the synthetic corpus. `family_size` scenes share a base and differ in one attribute."""
    if num_val + num_test >= num_images:
        raise ValueError(f"num_val + num_test ({num_val + num_test}) must be < num_images ({num_images})")
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    while len(scenes) < num_images:
        base = _random_scene(rng)
        scenes.append(base)
        for _ in range(family_size - 1):
            scenes.append(_perturb(scenes[-1], rng))
    scenes = scenes[:num_images]
    order = rng.permutation(num_images)  # families spread across splits: near-duplicates straddle them
    splits = np.array(["train"] * num_images, dtype=object)
    splits[order[:num_test]] = "test"
    splits[order[num_test:num_test + num_val]] = "val"

    sym = np.stack([_symbolic(s) for s in scenes])
    visual = _RandomNet(sym.shape[1] + NUISANCE_DIM, 4 * image_dim, image_dim, np.random.default_rng([seed, 1]))
    nuisance_z = rng.standard_normal((num_images, NUISANCE_DIM)).astype(np.float32) * nuisance
    feats = visual(np.concatenate([sym, nuisance_z], axis=1))
    feats = normalize_rows(feats + noise * rng.standard_normal(feats.shape).astype(np.float32))

    images = [ImageRecord(id=f"syn{i:06d}", split=str(splits[i])) for i in range(num_images)]
    train_texts: set[str] = set()
    queries: list[QueryRecord] = []
    # Train/val captions first, so test captions can avoid every training caption string.
    for i in sorted(range(num_images), key=lambda i: splits[i] == "test"):
        made: list[str] = []
        for attempt in range(50 * captions_per_image):
            if len(made) == captions_per_image:
                break
            text = _caption(scenes[i], rng, detail=min(0.9, 0.4 + 0.02 * attempt))
            if text in made or (splits[i] == "test" and text in train_texts):
                continue
            made.append(text)
        if splits[i] == "train":
            train_texts.update(made)
        queries += [QueryRecord(text=t, split=str(splits[i]), image_ids=(images[i].id,)) for t in made]
    return Corpus(
        name="synthetic", images=images, image_features=feats, queries=queries,
        text_features=text_features([q.text for q in queries], text_dim, seed), synthetic=True,
        metadata={"seed": seed, "family_size": family_size, "nuisance": nuisance, "noise": noise,
                  "note": "SYNTHETIC benchmark: random-network features of generated scenes, not real images"},
    )
