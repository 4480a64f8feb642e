"""How rare a caption tag is as text: CLIP BPE pieces, and a list of everyday caption tags.

A made-up trigger (``ohwx``, ``zkw_girl``) splits into several CLIP tokens; booru tags
and English words are one token per word. With CLIP's own merge table (found on the
machine: the WebUI installs it with ``clip``/``open_clip``, the Hugging Face cache holds
it with the tokenizer) the piece count is exact; without it lorakit estimates from the
word's shape and says so.

The tokenizer follows OpenAI CLIP's ``simple_tokenizer.py`` (byte-level BPE over
lower-cased words with an ``</w>`` end-of-word marker), the same one both WebUIs use.
"""

from __future__ import annotations

import functools
import glob
import gzip
import html
import importlib.util
import os
import re
from collections.abc import Iterable

# Python's re has no \p{L}; letters are [^\W\d_], numbers single digits, the rest punctuation runs.
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _byte_map() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class ClipBPE:
    """CLIP's byte-level BPE over a merge list (first merge = most frequent pair)."""

    def __init__(self, merges: Iterable[tuple[str, str]], source: str = ""):
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.source = source
        self._cache: dict[str, tuple[str, ...]] = {}
        self._produced: dict[str, int] | None = None

    @classmethod
    def from_file(cls, path: str) -> ClipBPE:
        """Load ``bpe_simple_vocab_16e6.txt.gz`` (CLIP) or a tokenizer's ``merges.txt`` (Hugging Face)."""
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        if path.endswith(".gz"):  # simple_tokenizer keeps lines 1 .. 49152-256-2
            lines = lines[1 : 49152 - 256 - 2 + 1]
        merges = []
        for line in lines:
            if not line or line.startswith("#version"):
                continue
            parts = line.split()
            if len(parts) == 2:
                merges.append((parts[0], parts[1]))
        return cls(merges, source=path)

    def word(self, token: str) -> tuple[str, ...]:
        """BPE pieces of one pre-split word (already lower-case)."""
        hit = self._cache.get(token)
        if hit is not None:
            return hit
        bm = _byte_map()
        chars = [bm[b] for b in token.encode("utf-8")]
        if not chars:
            return ()
        parts = chars[:-1] + [chars[-1] + "</w>"]
        while len(parts) > 1:
            best = min(((self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))))
            if best[0] == 1 << 30:
                break
            first, second = parts[best[1]], parts[best[1] + 1]
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        out = tuple(parts)
        if len(self._cache) < 100_000:
            self._cache[token] = out
        return out

    def tokenize(self, text: str) -> list[str]:
        """BPE pieces of ``text`` (lower-cased, whitespace-collapsed, as CLIP does)."""
        text = re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip().lower()
        out: list[str] = []
        for w in _WORDS.findall(text):
            out.extend(self.word(w))
        return out

    def merge_rank(self, piece: str) -> int | None:
        """Index of the merge that produced ``piece`` (lower = more frequent text); None for single bytes."""
        if self._produced is None:
            self._produced = {}
            for (a, b), r in self.ranks.items():
                self._produced.setdefault(a + b, r)
        return self._produced.get(piece)


def vocab_candidates() -> list[str]:
    """Where CLIP's merge table may be on this machine, most specific first."""
    out: list[str] = []
    env = os.environ.get("LORAKIT_CLIP_VOCAB")
    if env:
        out.append(env)
    for pkg in ("open_clip", "clip"):  # located without importing (importing open_clip pulls torchvision)
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                out.append(os.path.join(loc, "bpe_simple_vocab_16e6.txt.gz"))
    homes = [
        os.environ.get("HF_HUB_CACHE"),
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None,
        os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"),
    ]
    for h in homes:
        if h:
            out.extend(
                sorted(
                    glob.glob(os.path.join(h, "models--openai--clip-vit-large-patch14", "snapshots", "*", "merges.txt"))
                )
            )
    return out


_LOADED: dict[str, ClipBPE | None] = {}


def clip_bpe(extra_paths: Iterable[str] = ()) -> ClipBPE | None:
    """The CLIP tokenizer from the first merge table found, or None when there is none."""
    for path in [*extra_paths, *vocab_candidates()]:
        if path in _LOADED:
            if _LOADED[path] is not None:
                return _LOADED[path]
            continue
        bpe = None
        if os.path.isfile(path):
            try:
                bpe = ClipBPE.from_file(path)
            except (OSError, UnicodeDecodeError, EOFError):
                bpe = None
            if bpe is not None and len(bpe.ranks) < 1000:
                bpe = None  # not a real CLIP table
        _LOADED[path] = bpe
        if bpe is not None:
            return bpe
    return None


# Words that make up everyday caption tags (booru and natural-language captions). A tag made
# only of these is never a made-up trigger, whatever its share.
COMMON_WORDS = frozenset(
    """
1girl 2girls 3girls 4girls 5girls 6+girls 1boy 2boys 3boys multiple girls boys girl boy woman man women men person people
solo focus looking at viewer away back side another up down smile smiling open closed mouth eyes eye lips teeth tongue
blush blushing long short medium very hair hairs bangs ponytail twintails braid braided bun sidelocks ahoge bob cut
black white blonde brown red blue green purple pink grey gray silver orange yellow aqua multicolored streaked two-tone
gradient light dark pale tan skin breasts large small huge flat chest navel cleavage collarbone shoulders bare arms
legs thighs feet barefoot hands hand fingers nails holding sitting standing lying kneeling squatting walking running
jumping pose leaning crossed head tilt from above below behind side view profile portrait upper body full cowboy shot
close-up closeup outdoors indoors day night sky cloud clouds cloudy tree trees grass flower flowers water sea ocean beach
city street building room bed window background simple transparent gradient blurry depth field bokeh sunlight lighting
shadow rim backlighting glowing glow realistic photorealistic photo photograph anime style art illustration painting
sketch monochrome greyscale traditional media watercolor (medium) oil digital lineart cel shading 3d render
masterpiece best quality high highres absurdres lowres worst low normal amazing very-aesthetic aesthetic detailed
ultra-detailed intricate details score_9 score_8_up score_7_up score_6_up score_5_up score_4_up source_anime
source_cartoon source_furry source_pony rating_safe rating_questionable rating_explicit safe sensitive nsfw sfw
general questionable explicit newest recent mid early old year jpeg artifacts watermark signature text username
shirt t-shirt skirt dress jacket coat hoodie sweater pants shorts jeans shoes boots socks thighhighs pantyhose gloves
hat cap ribbon bow hairband hairclip hair ornament jewelry earrings necklace choker glasses uniform school serafuku
swimsuit bikini underwear lingerie bra panties kimono armor cape scarf tie necktie collar sleeves sleeveless off-shoulder
wearing clothes clothing outfit nude naked topless frills lace striped plaid
animal ears cat dog fox wolf rabbit tail wings horns halo pointy elf
happy sad angry surprised crying tears expression frown serious closed-eyes wink
weapon sword gun food drink cup book phone chair table car
a an the of and with in on at to for by is are wearing has having her his their its this that very
""".split()
)

# Tags that describe the picture or its quality, never a subject: not triggers even when in every caption.
GENERIC_TAGS = frozenset(
    {
        "1girl",
        "1boy",
        "solo",
        "2girls",
        "2boys",
        "multiple girls",
        "multiple boys",
        "solo focus",
        "masterpiece",
        "best quality",
        "high quality",
        "highres",
        "absurdres",
        "lowres",
        "very aesthetic",
        "aesthetic",
        "amazing quality",
        "normal quality",
        "worst quality",
        "detailed",
        "ultra-detailed",
        "realistic",
        "photorealistic",
        "looking at viewer",
        "simple background",
        "white background",
        "upper body",
        "full body",
        "portrait",
        "score_9",
        "score_8_up",
        "score_7_up",
        "score_6_up",
        "score_5_up",
        "score_4_up",
        "source_anime",
        "rating_safe",
        "rating_questionable",
        "rating_explicit",
        "safe",
        "sensitive",
        "nsfw",
        "general",
        "newest",
        "recent",
        "year 2023",
        "year 2024",
        "anime",
        "photo",
        "illustration",
        "woman",
        "man",
        "girl",
        "boy",
    }
)


def words_of(tag: str) -> list[str]:
    """The words of a tag that could carry meaning: letter runs of two or more (digits and punctuation drop out)."""
    return list(_words_of(tag))


_LETTER_RUNS = re.compile(r"[^\W\d_]+")


# pure functions of a string (and of the one CLIP table), called for every tag of every file: remembered
@functools.lru_cache(maxsize=1 << 16)
def _words_of(tag: str) -> tuple[str, ...]:
    return tuple(w for w in _LETTER_RUNS.findall(tag.lower()) if len(w) >= 2)


@functools.lru_cache(maxsize=1 << 16)
def is_generic(tag: str) -> bool:
    t = tag.strip().lower().replace("_", " ")
    return t in GENERIC_TAGS or tag.strip().lower() in GENERIC_TAGS or t.replace(" ", "_") in GENERIC_TAGS


_VOWELS = set("aeiouy")


def _looks_made_up(word: str) -> bool:
    """A guess without the CLIP table: digits inside letters, or runs of 3+ consonants, or no vowel at all."""
    letters = re.sub(r"[^a-z]", "", word)
    if not letters:
        return False
    if re.search(r"[a-z]\d|\d[a-z]", word):
        return True
    if not (set(letters) & _VOWELS) and len(letters) >= 2:
        return True
    run = best = 0
    for ch in letters:
        run = 0 if ch in _VOWELS else run + 1
        best = max(best, run)
    return best >= 4 or (best >= 3 and len(letters) <= 5)


@functools.lru_cache(maxsize=1 << 16)
def rarity(tag: str, bpe: ClipBPE | None) -> tuple[float, str]:
    """How unlike everyday caption text ``tag`` is, 0 (common) .. 1 (made up), with the reason.

    Returns:
        (score, evidence) where evidence names the CLIP pieces or the estimate used.
    """
    t = tag.strip().lower()
    if t in COMMON_WORDS or t.replace(" ", "_") in COMMON_WORDS or is_generic(t):
        return 0.0, "an everyday caption tag"
    words = words_of(tag)
    if not words:
        return 0.0, "no word in the tag (digits or punctuation only)"
    unknown = [w for w in words if w not in COMMON_WORDS]
    if not unknown:
        return 0.0, "everyday caption words"
    if bpe is not None:
        pieces = {w: bpe.word(w) for w in unknown}
        split = {w: p for w, p in pieces.items() if len(p) >= 2}
        if split:
            w, p = max(split.items(), key=lambda kv: len(kv[1]))
            n = sum(len(bpe.word(x)) for x in words)
            score = min(1.0, 0.5 + 0.2 * (len(p) - 1))
            shown = " ".join(x.replace("</w>", "") for x in p)
            return score, f"{w!r} splits into {len(p)} CLIP tokens ({shown}); the tag is {n} tokens"
        rare = [w for w in unknown if (bpe.merge_rank(pieces[w][0]) or 0) > 30_000]
        if rare:
            return 0.4, f"{rare[0]!r} is a single but rare CLIP token"
        return 0.15, f"{', '.join(repr(w) for w in unknown[:3])}: single common CLIP token(s)"
    made_up = [w for w in unknown if _looks_made_up(w)]
    mixed = [
        r
        for r in re.findall(r"[a-z0-9]+", t)
        if re.search(r"[a-z]{2}", r)
        and re.search(r"\d", r)
        and not re.fullmatch(r"\d+(?:girls?|boys?|others?|koma)|v\d+|\d+d|\d+k|\d+s", r)
    ]
    if mixed:
        return (
            0.7,
            f"{mixed[0]!r} mixes letters and digits like a made-up name (estimate; no CLIP vocabulary on this machine)",
        )
    if made_up:
        return 0.7, f"{made_up[0]!r} does not look like a word (estimate; no CLIP vocabulary on this machine)"
    return 0.35, (
        f"{', '.join(repr(w) for w in unknown[:3])} not among everyday caption words "
        "(estimate; no CLIP vocabulary on this machine)"
    )
