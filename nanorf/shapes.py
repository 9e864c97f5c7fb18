"""The shapes world v2: GenEval in miniature (docs/method.md, "The shapes world").

A procedural text-image world, deterministic from a seed, that trains the whole method on a
CPU in minutes and can be scored exactly by pixel analysis (nanorf.eval). Scenes hold 1 to 4
objects (colour, shape, cell of a 3x3 grid), colours and shapes free to repeat, one object per
cell. Prompts come in five kinds, and only `located` names cells; the others leave the layout
to the model, as GenEval's prompts do:

    single    a red circle
    two       a red circle and a blue square            (the two differ in colour, shape or both)
    counting  two red circles / three ... / four ...
    position  a red circle to the left of a blue square (also: to the right of, above, below)
    located   a red circle at the top left [and a blue square at the right]   (the v1 captions)

Every scene shows exactly its prompt's objects, in cells drawn at random where the prompt
leaves them open. Understanding questions come from the same scenes (`questions`). nanorf.data
re-exports this module's public names; nanorf.eval scores pictures against prompts.

Choices the design leaves open, made here:
- Rasterisation samples pixel centres, no antialiasing, so only palette colours appear. The
  upright triangle grows linearly row by row to the full box width at its base, keeping at
  least the pixel nearest its axis on the apex row (else the apex can fall between pixels).
- The canvas is square by default; an (H, W) pair gives cells of H/3 x W/3. Boxes are square,
  their side drawn from 60-90% of the shorter cell side. A box that would poke off the canvas
  (edge cells allow 3% of a cell) is pulled back toward its cell centre.
- Objects never touch, and more strictly than asked: no two are 8-neighbours, so a diagonal
  contact cannot merge them either. A layout that breaks this is redrawn whole, which biases
  boxes of crowded scenes a little toward small.
- `counting` draws 2, 3 or 4 objects with equal odds; `located` prompts name 1 or 2 objects
  with equal odds (as v1 did), and their objects may now share colour or shape. `located`
  captions of 3 or 4 objects exist only as `describe the image.` answers; they parse too.
- The held-out split hashes (sha256) a canonical form of each caption: the objects of `two`
  sorted, `B right of A` written as `A left of B` (`below` as `above`), the objects of
  `located` in row-major cell order. No `single` caption is held out: there are only 18, and
  every other kind is built from them; evaluation scores `single` on all 18.
- The training stream also redraws any scene whose `describe` answer is a held-out `located`
  caption, so training never sees a held-out caption as prompt or as answer. The test split
  draws only held-out prompts, so it has no `single` items.
- Evaluation prompts (`held_out_prompts`) are drawn as training draws prompts, but only among
  held-out captions, with no repeat until a kind's pool is spent. At 1/8 the pools are: two 38
  captions (19 pairs, both orders), counting 5, position 168, located 2,946; single all 18.
- Text lengths: every prompt fits in 80 bytes; the longest answer, a 4-object description, is
  MAX_ANSWER_BYTES = 159 bytes. The byte tokenizer raises rather than truncate, so a model must
  hold max_text_len >= 159 to train on every question.
- Question choice per scene: every `how many` for a present colour+shape plus one for an
  absent one (answer `zero`); every `where is` that names a unique object; `what shape is at`
  every occupied cell plus one empty cell (answer `nothing`); every `what color is` whose shape
  is unique in the scene.
"""

from __future__ import annotations

import hashlib
import operator
import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

PALETTE = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (40, 80, 255),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 220, 220),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right",
             "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # the 3x3 grid of cells, row-major
KINDS = ("single", "two", "counting", "position", "located")
RELATIONS = ("to the left of", "to the right of", "above", "below")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_KINDS = ("describe", "count", "where", "shape", "color")
MAX_OBJECTS = 4

# Kept equal to config.TrainConfig.kinds (a test checks). single is rare: it has 18 captions and
# its objects appear in every other kind; counting and position get the most, as they ask the
# most planning (up to four objects; a relation between two); located keeps v1's explicit cells.
DEFAULT_KINDS = (0.1, 0.2, 0.25, 0.25, 0.2)
# Of each kind's canonical captions. At 1/16 counting held out 1 of its 54 captions; at 1/8 it
# holds out 5 (two: 19 of 153 pairs, position: 84 of 612, located: 1,481 of 11,826).
HELD_OUT_FRACTION = 1 / 8


@dataclass(frozen=True)
class Obj:
    """One object: colour, shape, and its cell (None where a prompt leaves the cell open)."""
    color: str
    shape: str
    position: str | None = None

    def __post_init__(self):
        if self.color not in PALETTE or self.shape not in SHAPES or self.position not in (None, *POSITIONS):
            raise ValueError(f"not an object of the shapes world: {self!r}")

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def _cell_order(objects) -> tuple[Obj, ...]:
    return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))


@dataclass(frozen=True)
class Scene:
    """1 to 4 objects, each in its own cell."""
    objects: tuple[Obj, ...]

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        n = len(self.objects)
        if not 1 <= n <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {n}")
        if any(o.position is None for o in self.objects) or len({o.position for o in self.objects}) < n:
            raise ValueError("every object of a scene needs a cell of its own")


@dataclass(frozen=True)
class Prompt:
    """A caption and what it asks for. `objects` are the named objects: `counting` repeats one
    object n times; only `located` gives cells. `relation` (position only) holds from
    objects[0] to objects[1]."""
    kind: str
    objects: tuple[Obj, ...]
    relation: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        objs, n = self.objects, len(self.objects)
        located = self.kind == "located"
        ok = {"single": n == 1, "two": n == 2 and objs[0] != objs[1],
              "counting": 2 <= n <= MAX_OBJECTS and len(set(objs)) == 1,
              "position": n == 2 and objs[0] != objs[1] and self.relation in RELATIONS,
              "located": 1 <= n <= MAX_OBJECTS and len({o.position for o in objs}) == n}.get(self.kind, False)
        if not ok or (self.relation is not None) != (self.kind == "position") or \
                any((o.position is not None) != located for o in objs):
            raise ValueError(f"not a {self.kind!r} prompt: {self!r}")

    @property
    def text(self) -> str:
        o = self.objects
        if self.kind == "counting":
            return f"{NUMBERS[len(o)]} {o[0].name}s"
        if self.kind == "position":
            return f"a {o[0].name} {self.relation} a {o[1].name}"
        if self.kind == "located":
            return " and ".join(f"a {x.name} at the {x.position}" for x in o)
        return " and ".join(f"a {x.name}" for x in o)


def located(scene: Scene) -> Prompt:
    """The scene as a `located` prompt, objects in row-major cell order: its full description."""
    return Prompt("located", _cell_order(scene.objects))


def describe(scene: Scene) -> str:
    return located(scene).text


def holds(relation: str, a: str, b: str) -> bool:
    """Whether cell a is `relation` cell b: a's column strictly left of b's, and so on."""
    (ra, ca), (rb, cb) = divmod(POSITIONS.index(a), 3), divmod(POSITIONS.index(b), 3)
    return {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


# --- captions back to prompts -------------------------------------------------------------------

_OBJ = f"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_LOCATED_PART = re.compile(f"{_OBJ} at the ({'|'.join(sorted(POSITIONS, key=len, reverse=True))})")
_COUNTING = re.compile(f"({'|'.join(NUMBERS[2:])}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})s")
_POSITION = re.compile(f"{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}")
_TWO = re.compile(f"{_OBJ} and {_OBJ}")
_SINGLE = re.compile(_OBJ)


def parse_caption(text) -> Prompt | None:
    """Inverse of Prompt.text for every kind (v1 captions are `located`); None for text that is
    not a caption of a legal prompt. Case and runs of spaces do not matter."""
    if not isinstance(text, str):
        return None
    text = " ".join(text.lower().split())
    try:
        if " at the " in text:
            parts = [_LOCATED_PART.fullmatch(p) for p in text.split(" and ")]
            if all(parts):
                return Prompt("located", tuple(Obj(*m.groups()) for m in parts))
        elif m := _COUNTING.fullmatch(text):
            return Prompt("counting", (Obj(m[2], m[3]),) * NUMBERS.index(m[1]))
        elif m := _POSITION.fullmatch(text):
            return Prompt("position", (Obj(m[1], m[2]), Obj(m[4], m[5])), m[3])
        elif m := _TWO.fullmatch(text):
            return Prompt("two", (Obj(m[1], m[2]), Obj(m[3], m[4])))
        elif m := _SINGLE.fullmatch(text):
            return Prompt("single", (Obj(m[1], m[2]),))
    except ValueError:  # e.g. `a red circle and a red circle`, or two objects in one cell
        return None
    return None


# --- drawing prompts and scenes -----------------------------------------------------------------

_CLASSES = tuple(Obj(c, s) for c in COLORS for s in SHAPES)  # the 18 colour+shape pairs


def draw_prompt(kind: str, rng: random.Random) -> Prompt:
    if kind == "single":
        return Prompt(kind, (rng.choice(_CLASSES),))
    if kind == "two":
        return Prompt(kind, tuple(rng.sample(_CLASSES, 2)))
    if kind == "counting":
        return Prompt(kind, (rng.choice(_CLASSES),) * rng.choice((2, 3, 4)))
    if kind == "position":
        return Prompt(kind, tuple(rng.sample(_CLASSES, 2)), rng.choice(RELATIONS))
    if kind == "located":
        cells = rng.sample(POSITIONS, rng.choice((1, 2)))
        return Prompt(kind, tuple(Obj(o.color, o.shape, c) for o, c in zip(rng.choices(_CLASSES, k=len(cells)), cells)))
    raise ValueError(f"unknown prompt kind {kind!r}; choose one of {', '.join(KINDS)}")


def draw_scene(prompt: Prompt, rng: random.Random) -> Scene:
    """A scene of exactly the prompt's objects, in cells drawn uniformly among those that fit."""
    if prompt.kind == "located":
        return Scene(prompt.objects)
    if prompt.kind == "position":
        pairs = [(a, b) for a in POSITIONS for b in POSITIONS if holds(prompt.relation, a, b)]
        cells = rng.choice(pairs)
    else:
        cells = rng.sample(POSITIONS, len(prompt.objects))
    return Scene(tuple(Obj(o.color, o.shape, c) for o, c in zip(prompt.objects, cells)))


# --- rendering ----------------------------------------------------------------------------------

def canvas_shape(size) -> tuple[int, int]:
    """An int side or an (H, W) pair -> (H, W), each a positive multiple of 16."""
    hw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, (int, np.integer)) and s >= 16 and s % 16 == 0 for s in hw):
        raise ValueError(f"canvas size must be a positive multiple of 16 (or an (H, W) pair of them), got {size!r}")
    return int(hw[0]), int(hw[1])


def _object_mask(obj: Obj, h: int, w: int, rng: random.Random) -> np.ndarray:
    """(h, w) bool mask of one object, its box side and jitter drawn from rng."""
    ch, cw = h / 3, w / 3
    row, col = divmod(POSITIONS.index(obj.position), 3)
    half = rng.uniform(0.6, 0.9) * min(ch, cw) / 2
    cx = (col + 0.5) * cw + rng.uniform(-0.08, 0.08) * cw
    cy = (row + 0.5) * ch + rng.uniform(-0.08, 0.08) * ch
    cx, cy = min(max(cx, half), w - half), min(max(cy, half), h - half)
    y, x = np.mgrid[0:h, 0:w] + 0.5  # pixel centres, each (h, w)
    if obj.shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if obj.shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
    rows = np.abs(y[:, 0] - cy) <= half  # (h,) rows the triangle spans
    k = np.cumsum(rows) - 1  # row index inside the triangle, apex = 0
    half_width = np.maximum(half * (k + 1) / rows.sum(), 0.5)  # (h,)
    return rows[:, None] & (np.abs(x - cx) <= half_width[:, None])


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask and its 8-neighbours."""
    p = np.pad(mask, 1)
    return np.any([p[1 + dy:1 + dy + mask.shape[0], 1 + dx:1 + dx + mask.shape[1]]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def object_map(scene: Scene, size, rng: random.Random) -> np.ndarray:
    """(H, W) uint8 map: 0 background, k + 1 where scene.objects[k] lies; rng draws box sides
    and jitter. Redrawn until no two objects are 8-neighbours."""
    h, w = canvas_shape(size)
    for _ in range(1000):
        masks = [_object_mask(o, h, w, rng) for o in scene.objects]
        grown = [_grow(m) for m in masks]
        if not any((grown[a] & masks[b]).any() for a in range(len(masks)) for b in range(a + 1, len(masks))):
            break
    else:
        raise RuntimeError(f"could not lay out {describe(scene)!r} with objects apart")
    out = np.zeros((h, w), np.uint8)
    for k, m in enumerate(masks):
        out[m] = k + 1
    return out


def paint(scene: Scene, objects: np.ndarray) -> np.ndarray:
    """An object_map -> (H, W, 3) uint8 image on black."""
    lut = np.array([(0, 0, 0)] + [PALETTE[o.color] for o in scene.objects], np.uint8)  # (1 + n, 3)
    return lut[objects]


def render(scene: Scene, size, rng: random.Random) -> np.ndarray:
    """(H, W, 3) uint8 image of the scene on black; size is a side or (H, W)."""
    return paint(scene, object_map(scene, size, rng))


# --- understanding ------------------------------------------------------------------------------

def question_kind(question: str) -> str:
    """Which of QUESTION_KINDS a question of `questions` is."""
    for prefix, kind in (("describe", "describe"), ("how many", "count"), ("where", "where"),
                         ("what shape", "shape"), ("what color", "color")):
        if question.startswith(prefix):
            return kind
    raise ValueError(f"not a shapes-world question: {question!r}")


def questions(scene: Scene, rng: random.Random | None = None) -> list[tuple[str, str]]:
    """(question, answer) pairs about the scene, `describe the image.` first. rng picks the absent
    colour+shape and the empty cell asked about; without it, the first of each."""
    objs = _cell_order(scene.objects)
    pick = rng.choice if rng is not None else operator.itemgetter(0)
    qa = [("describe the image.", describe(scene))]
    counts = Counter(o.name for o in objs)
    absent = [c.name for c in _CLASSES if c.name not in counts]
    for name in [*counts, pick(absent)]:
        qa.append((f"how many {name}s are there?", NUMBERS[counts[name]]))
    qa += [(f"where is the {o.name}?", o.position) for o in objs if counts[o.name] == 1]
    empty = [c for c in POSITIONS if c not in {o.position for o in objs}]
    qa += [(f"what shape is at the {o.position}?", o.shape) for o in objs]
    if empty:
        qa.append((f"what shape is at the {pick(empty)}?", "nothing"))
    shapes = Counter(o.shape for o in objs)
    qa += [(f"what color is the {o.shape}?", o.color) for o in objs if shapes[o.shape] == 1]
    return qa


def _longest_describe() -> int:
    word = lambda xs: max(map(len, xs))
    cells = sorted(map(len, POSITIONS), reverse=True)[:MAX_OBJECTS]
    per_object = len("a  ") + word(COLORS) + word(SHAPES) + len(" at the ")
    return MAX_OBJECTS * per_object + sum(cells) + (MAX_OBJECTS - 1) * len(" and ")


MAX_ANSWER_BYTES = _longest_describe()  # a 4-object describe answer; every prompt is shorter


def vocabulary() -> tuple[str, ...]:
    """Every word the world's captions, questions and answers use, "?" and "." left off: the
    word list of the toy's `bytes+shapes` tokenizer (nanorf/tokenizer.py)."""
    fixed = "a and at the how many are there where is what shape color describe image nothing".split()
    words = [*fixed, *COLORS, *SHAPES, *(s + "s" for s in SHAPES), *NUMBERS,
             *(w for text in POSITIONS + RELATIONS for w in text.split())]
    return tuple(dict.fromkeys(words))


# --- the held-out split -------------------------------------------------------------------------

def canonical(prompt: Prompt) -> str:
    """One text per caption class that must fall on one side of the split."""
    o = prompt.objects
    if prompt.kind == "two":
        o = tuple(sorted(o, key=lambda x: x.name))
    elif prompt.kind == "position" and prompt.relation in ("to the right of", "below"):
        return Prompt("position", o[::-1], {"to the right of": "to the left of", "below": "above"}[prompt.relation]).text
    elif prompt.kind == "located":
        o = _cell_order(o)
    return Prompt(prompt.kind, o, prompt.relation).text


def is_held_out(prompt, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Deterministic split by a stable hash (not Python's salted hash()) of the canonical form.
    Accepts a Prompt or a caption; text that is not a caption hashes as it is."""
    if isinstance(prompt, str):
        prompt = parse_caption(prompt) or prompt
    if isinstance(prompt, Prompt):
        if prompt.kind == "single":
            return False
        prompt = f"{prompt.kind}:{canonical(prompt)}"
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def _kind_weights(kinds) -> tuple[float, ...]:
    w = tuple(float(x) for x in kinds)
    if len(w) != len(KINDS) or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"kinds must be {len(KINDS)} weights >= 0 for {', '.join(KINDS)}, not all 0; got {kinds!r}")
    return w


class ShapesWorld:
    """Deterministic, unbounded dataset: item i is a pure function of (seed, split, i).

    kinds: weights of KINDS, in that order. split "train" redraws held-out prompts (and scenes
    whose description is held out); "test" draws only held-out prompts, so never `single`.
    There is no __len__: index it with any i >= 0. Items are dicts: image (H, W, 3) uint8,
    caption, qa (list of (question, answer)), kind, prompt, scene, and object_map (H, W)
    uint8 (0 background, k + 1 for scene.objects[k]).
    """

    def __init__(self, size=32, seed=0, split="train", kinds=DEFAULT_KINDS, held_out_fraction=HELD_OUT_FRACTION):
        self.shape = canvas_shape(size)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not 0.0 < held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction}")
        self.kinds = _kind_weights(kinds)
        if split == "test":
            self.kinds = (0.0, *self.kinds[1:])
            if not sum(self.kinds):
                raise ValueError("the test split has no single prompts; give another kind some weight")
        self.size, self.seed, self.split, self.held_out_fraction = size, seed, split, held_out_fraction

    def draw(self, i: int, kind: str | None = None) -> tuple[Prompt, Scene, random.Random]:
        """Item i's prompt and scene (of the given kind, else one drawn by the weights), and the
        rng that will draw its pixels."""
        i = operator.index(i)
        if i < 0:
            raise IndexError(f"ShapesWorld index must be >= 0, got {i}")
        rng = random.Random(f"{self.seed}:{self.split}:{i}" + (f":{kind}" if kind else ""))  # str seeds hash stably
        kind = kind or rng.choices(KINDS, self.kinds)[0]
        held = lambda p: is_held_out(p, self.held_out_fraction)
        for _ in range(100_000):
            prompt = draw_prompt(kind, rng)
            if held(prompt) != (self.split == "test"):
                continue
            scene = draw_scene(prompt, rng)
            if self.split == "test" or not held(located(scene)):
                return prompt, scene, rng
        raise RuntimeError(f"no {self.split} {kind} prompt found; is held_out_fraction too extreme?")

    def item(self, i: int, kind: str | None = None) -> dict:
        prompt, scene, rng = self.draw(i, kind)
        objects = object_map(scene, self.size, rng)
        return {"image": paint(scene, objects), "caption": prompt.text, "qa": questions(scene, rng),
                "kind": prompt.kind, "prompt": prompt, "scene": scene, "object_map": objects}

    def __getitem__(self, i: int) -> dict:
        return self.item(i)


def held_out_prompts(n_per_kind: int = 50, seed: int = 1234, kinds=KINDS,
                     fraction: float = HELD_OUT_FRACTION) -> list[Prompt]:
    """Evaluation prompts: n_per_kind of each kind, drawn as training draws them but only among
    held-out captions (single: among all 18). No caption repeats until its kind's pool looks spent
    (200 repeats drawn in a row); then a new round starts, so a small pool is covered evenly.
    Ordered round-robin over kinds (single, two, ..., single, ...), so any prefix mixes them."""
    per_kind = []
    for kind in kinds:
        rng, got, seen, repeats = random.Random(f"{seed}:eval:{kind}"), [], set(), 0
        for _ in range(100_000 * (n_per_kind + 200)):
            if len(got) == n_per_kind:
                break
            p = draw_prompt(kind, rng)
            if kind != "single" and not is_held_out(p, fraction):
                continue
            if p in seen and repeats < 200:
                repeats += 1
                continue
            if p in seen:
                seen = set()
            seen.add(p), got.append(p)
            repeats = 0
        if len(got) < n_per_kind:
            raise RuntimeError(f"no held-out {kind} prompt found; is fraction too small?")
        per_kind.append(got)
    return [p for row in zip(*per_kind) for p in row]
