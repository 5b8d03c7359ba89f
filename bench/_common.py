"""Shared by the benchmarks: a deterministic generated corpus, the indexer's own chunking,
synthetic vectors, timing helpers, Markdown tables and JSON results.

The corpus is English-like rather than English: sentences come from a small template grammar
over fixed word lists (a few hundred nouns, verbs, adjectives; generated proper names and
codes for a long tail), each list drawn with Zipf-like frequencies and a seeded RNG. Each
document keeps mostly to one or two themes (gardening, history, software ...), so that the
collection clusters by subject as real ones do. That gives
what the benchmarks depend on -- realistic word-piece counts per word, a skewed vocabulary for
BM25, varied chunk lengths, Markdown headings for the chunker -- and the same bytes on every
machine, with no data set to download.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import itertools
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"

# --- word lists ---------------------------------------------------------------------------

NOUNS_BY_THEME = """
system file index model query answer document page section chapter table record value
server client request response network cache memory disk folder library package module
function method class object error warning message report result test benchmark figure
garden soil compost seed plant root leaf flower tree branch water river valley mountain
forest field harvest season weather summer winter spring autumn rain wind storm cloud
kitchen recipe flour sugar butter oven bread dough salt pepper onion garlic tomato sauce
history empire kingdom war treaty village city market trade merchant ship harbour road
bridge castle church council charter law court judge witness letter archive museum
science experiment theory measure sample particle energy force field wave light signal
cell protein gene enzyme membrane tissue organ patient doctor hospital treatment dose
student teacher school lesson course exam grade paper essay review author editor reader
engine motor wheel brake battery charge sensor switch circuit wire cable pump valve pipe
account payment invoice budget price cost profit tax bank loan contract customer supplier
window door wall floor roof stair room house office desk chair lamp shelf drawer
animal bird fish horse sheep cattle insect bee nest egg feather wing tail claw
problem solution method process step stage phase cycle pattern rule policy option setting
language word sentence phrase grammar meaning translation dictionary alphabet symbol
music song rhythm melody instrument piano violin drum concert audience stage band
camera image picture colour shadow frame lens screen display pixel format layer
journey travel map route station train platform ticket passenger driver vehicle
container volume quota backup snapshot generation manifest checkpoint version release
thread process lock queue batch worker task job schedule timer clock interval
question evidence source citation claim argument reason conclusion summary outline
"""

VERBS_BY_THEME = """
open close start finish load store scan save check update remove add create delete
measure compare count collect select filter sort divide merge join assemble train test
plant water harvest prune mulch cook bake boil roast slice stir mix pour serve taste
travel visit cross reach enter exit follow guide steer carry push pull lift drop
explain describe discuss mention report suggest argue claim prove reject accept allow
improve reduce increase expand limit protect cover contain include exclude support
connect configure install deploy monitor record restore refresh retry verify validate
design plan draft edit review publish print copy paste search index rank score embed
heat cool dry clean wash paint repair replace adjust align attach detach mount
observe notice detect predict estimate calculate derive assume consider decide
"""
NOUNS = NOUNS_BY_THEME.split()
VERBS = VERBS_BY_THEME.split()

ADJECTIVES = """
small large quick slow early late new old simple complex common rare public private
local remote main final current previous next first last short long high low
bright dark warm cold dry wet soft hard heavy light fresh ripe green red blue yellow
ancient modern rural urban northern southern coastal inland royal civil military
careful precise rough exact typical unusual important minor major central external
internal stable fragile safe risky cheap expensive useful empty full open closed
digital manual automatic optional default strict loose dense sparse narrow wide
clear hidden visible silent loud deep shallow steep gentle rapid steady
""".split()

ADVERBS = """
quickly slowly carefully often rarely usually always never sometimes later
already soon again together separately gradually suddenly finally easily
""".split()

PREPOSITIONS = "in on at for from with without under over after before during between through into near".split()
DETERMINERS = "the the the a a this that each every some any one another".split()
MODALS = "can could should must may might will would".split()
CONJUNCTIONS = "and but or so because although while".split()
_SYLLABLES = "ka ri to mel an dor sa vi lo ren tha qu is el mor bra ny ost gal fen ur cas pe dra lin mo zu".split()

# --- morphology (regular forms only: the word lists avoid irregular verbs and plurals) -----


def _plural(word: str) -> str:
    if word.endswith(("s", "sh", "ch", "x", "z")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith("f"):
        return word[:-1] + "ves"
    return word + "s"


def _third(word: str) -> str:
    return _plural(word) if not word.endswith("f") else word + "s"


def _past(word: str) -> str:
    if word.endswith("e"):
        return word + "d"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ied"
    if word in {"stop", "plan", "drop", "stir", "prune"}:
        return word + word[-1] + "ed"
    return word + "ed"


class _Zipf:
    """Draws items with weight 1/(rank+1)^s, ranks shuffled by the seed."""

    def __init__(self, items: Sequence[str], rng: random.Random, s: float = 0.6) -> None:
        self.items = list(items)
        rng.shuffle(self.items)
        self.cum = list(itertools.accumulate(1.0 / (r + 1) ** s for r in range(len(self.items))))

    def __call__(self, rng: random.Random) -> str:
        return self.items[bisect.bisect(self.cum, rng.random() * self.cum[-1])]


class _Topical:
    """A word class drawn mostly (``share``) from the current topic's groups, else from all words."""

    def __init__(self, groups: Sequence[Sequence[str]], rng: random.Random, share: float = 0.7) -> None:
        self.general = _Zipf([w for g in groups for w in g], rng)
        self.groups = [_Zipf(g, rng) for g in groups]
        self.share = share
        self.active: list[int] = []

    def __call__(self, rng: random.Random) -> str:
        if self.active and rng.random() < self.share:
            return self.groups[rng.choice(self.active)](rng)
        return self.general(rng)


class TextGenerator:
    """Deterministic English-like sentences, paragraphs and Markdown documents.

    >>> TextGenerator(1).sentence() == TextGenerator(1).sentence()
    True
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        vocab_rng = random.Random(12345)  # the vocabulary is the same for every seed
        names = sorted(
            {
                "".join(vocab_rng.choice(_SYLLABLES) for _ in range(vocab_rng.randint(2, 3))).capitalize()
                for _ in range(400)
            }
        )
        codes = sorted(
            {f"{vocab_rng.choice(['ERR', 'RFC', 'ISO', 'API', 'CVE'])}-{vocab_rng.randint(100, 9999)}" for _ in range(300)}
            | {f"v{vocab_rng.randint(0, 9)}.{vocab_rng.randint(0, 20)}.{vocab_rng.randint(0, 9)}" for _ in range(100)}
        )
        # Each line of NOUNS and VERBS is a theme; a document keeps to one or two (see ``topic``).
        self.noun = _Topical([line.split() for line in NOUNS_BY_THEME.strip().splitlines()], vocab_rng)
        self.verb = _Topical([line.split() for line in VERBS_BY_THEME.strip().splitlines()], vocab_rng)
        self.adj = _Zipf(ADJECTIVES, vocab_rng)
        self.adv = _Zipf(ADVERBS, vocab_rng)
        self.prep = _Zipf(PREPOSITIONS, vocab_rng)
        self.det = _Zipf(DETERMINERS, vocab_rng, s=0.5)
        self.modal = _Zipf(MODALS, vocab_rng)
        self.conj = _Zipf(CONJUNCTIONS, vocab_rng)
        self.name = _Zipf(names, vocab_rng, s=1.0)
        self.code = _Zipf(codes, vocab_rng, s=1.0)

    def topic(self) -> None:
        """Pick the themes of the next document: real collections cluster by subject."""
        r = self.rng
        self.noun.active = r.sample(range(len(self.noun.groups)), r.choice((1, 2)))
        self.verb.active = [r.randrange(len(self.verb.groups))]

    def _np(self) -> str:
        """A noun phrase: 'the old harbour', 'three cables', 'Kalin'."""
        r = self.rng
        roll = r.random()
        if roll < 0.08:
            return self.name(r)
        if roll < 0.16:
            return f"{r.randint(2, 90)} {_plural(self.noun(r))}"
        words = [self.det(r)]
        if r.random() < 0.45:
            words.append(self.adj(r))
        if r.random() < 0.2:
            words.append(self.noun(r))  # compound: "the disk quota"
        words.append(self.noun(r))
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        return " ".join(words)

    def _clause(self) -> str:
        r = self.rng
        roll = r.random()
        if roll < 0.35:
            return f"{self._np()} {_third(self.verb(r))} {self._np()}"
        if roll < 0.55:
            return f"{self._np()} {_past(self.verb(r))} {self._np()} {self.prep(r)} {self._np()}"
        if roll < 0.7:
            return f"{self._np()} {self.modal(r)} {self.verb(r)} {self._np()}"
        if roll < 0.8:
            return f"{self._np()} {_third(self.verb(r))} {self.adv(r)}"
        if roll < 0.9:
            return f"{self.name(r)} {_past(self.verb(r))} {self._np()} in {r.randint(1200, 2030)}"
        return f"you {self.modal(r)} {self.verb(r)} {self._np()} with {self.code(r)}"

    def sentence(self) -> str:
        r = self.rng
        parts = [self._clause()]
        while r.random() < 0.4:
            parts.append(f"{self.conj(r)} {self._clause()}")
        if r.random() < 0.3:
            parts.append(f"{self.prep(r)} {self._np()}")
        text = " ".join(parts)
        if r.random() < 0.12:
            text = f"{self.adv(r)}, {text}"
        return text[0].upper() + text[1:] + ("?" if r.random() < 0.04 else ".")

    def paragraph(self, sentences: tuple[int, int] = (3, 7)) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(*sentences)))

    def heading(self) -> str:
        r = self.rng
        words = [self.adj(r), self.noun(r)] if r.random() < 0.6 else [self.verb(r), self.det(r), self.noun(r)]
        if r.random() < 0.3:
            words += ["and", self.noun(r)]
        return " ".join(words).capitalize()

    def question(self) -> str:
        """A search-box query: 'how to prune the garden hedge', 'ERR-4021 disk quota'."""
        r = self.rng
        self.topic()
        roll = r.random()
        if roll < 0.4:
            return f"how {self.modal(r)} {self._np()} {self.verb(r)} {self._np()}?"
        if roll < 0.6:
            return f"what {_third(self.verb(r))} {self._np()} {self.prep(r)} {self._np()}?"
        if roll < 0.8:
            return f"{self.adj(r)} {self.noun(r)} {self.noun(r)}"
        return f"{self.code(r)} {self.noun(r)} {_past(self.verb(r))}"

    def markdown(self, *, sections: tuple[int, int] = (3, 6), paragraphs: tuple[int, int] = (1, 4)) -> str:
        r = self.rng
        self.topic()
        title = " ".join(w.capitalize() for w in (self.adj(r), self.noun(r), self.noun(r)))
        out = [f"# {title}", "", self.paragraph(), ""]
        for _ in range(r.randint(*sections)):
            out += [f"## {self.heading()}", ""]
            for _ in range(r.randint(*paragraphs)):
                if r.random() < 0.15:
                    out += [f"- {self.sentence()}" for _ in range(r.randint(3, 6))]
                else:
                    out.append(self.paragraph())
                out.append("")
            if r.random() < 0.25:
                out += [f"### {self.heading()}", "", self.paragraph(), ""]
        return "\n".join(out)

    def short_markdown(self) -> str:
        """A small note: a title, an intro paragraph and 0-2 short sections (1-3 chunks)."""
        r = self.rng
        self.topic()
        out = [f"# {self.heading()}", "", self.paragraph((2, 5)), ""]
        for _ in range(r.randint(0, 2)):
            out += [f"## {self.heading()}", "", self.paragraph((2, 5)), ""]
        return "\n".join(out)

    def chunk_text(self, words: tuple[int, int] = (90, 160)) -> str:
        """About one chunk's worth of prose (200 word-pieces is ~150 words here)."""
        self.topic()
        target = self.rng.randint(*words)
        out: list[str] = []
        n = 0
        while n < target:
            s = self.sentence()
            out.append(s)
            n += s.count(" ") + 1
        return " ".join(out)


# --- corpora on disk and the indexer's own chunking --------------------------------------


def write_corpus(root: Path, documents: Sequence[str], *, prefix: str = "doc") -> list[Path]:
    """Write ``documents`` as ``root/<prefix>-00000.md`` ..., spread over 10 sub-folders."""
    paths = []
    for i, text in enumerate(documents):
        path = root / f"part-{i % 10}" / f"{prefix}-{i:05d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


@dataclass(frozen=True)
class ChunkedFile:
    source: str
    texts: tuple[str, ...]  # what the model embeds (embedding_text), in document order


def chunk_corpus(settings, embedder) -> list[ChunkedFile]:  # type: ignore[no-untyped-def]
    """The chunk texts ``sync_index`` would embed for ``settings.corpus_dir``, file by file.

    The same calls as ``rag.indexing.sync_index``: scan, read bytes, ``load_bytes``,
    ``chunk_documents`` (the embedder's tokenizer and window), ``embedding_text``.
    """
    from rag.chunking import embedding_text
    from rag.indexing import chunk_documents
    from rag.loaders import load_bytes, scan_corpus

    scan = scan_corpus(settings.corpus_dir, max_bytes=settings.max_file_bytes)
    out = []
    for file in scan.files:
        documents = load_bytes(file.source, file.path.read_bytes())
        chunks = chunk_documents(documents, settings, embedder)
        out.append(ChunkedFile(file.source, tuple(embedding_text(c) for c in chunks)))
    return out


def load_embedder(batch_size: int = 16):  # type: ignore[no-untyped-def]
    """The app's real embedder, model loaded and warmed up (first calls allocate)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from rag.embedding import SentenceTransformerEmbedder

    # The app's query path: the ONNX export, kept with the other cached bench inputs.
    embedder = SentenceTransformerEmbedder(batch_size=batch_size, cache_dir=RESULTS_DIR / "cache")
    embedder.embed(["warm up the model", "and its tokenizer " * 40])
    embedder.embed_query("warm up the query path")
    return embedder


# --- synthetic document vectors -----------------------------------------------------------


def synthetic_vectors(base: np.ndarray, n: int, *, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    """``n`` unit vectors shaped like ``base`` (real embeddings), in float32.

    Each is a random mix of a real vector and one of its 10 nearest real neighbours (up to
    half-way), plus Gaussian noise with the real vectors' own covariance scaled to a norm of
    about ``noise``, renormalised. Mixing neighbours (not random pairs, whose average drifts to
    the centre) keeps the real vectors' topical clusters; noise drawn from their covariance keeps
    the synthetic ones inside the narrow cone and the few directions real sentence embeddings
    use (isotropic noise would spread them over all 384 dimensions, which no real corpus does,
    and make approximate search look worse than it is); the noise also keeps the 50 children
    of the same parents from collapsing onto one point (which would make it look better).
    ``docs/benchmarks.md`` compares the neighbour statistics of the two.
    """
    rng = np.random.default_rng(seed)
    dim = base.shape[1]
    centered = base - base.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered / max(1, len(base) - 1))
    eigenvalues = np.clip(eigenvalues, 0, None)
    # z @ shape has covariance cov(base) * noise^2 / trace(cov): norm ~ noise.
    shape = (eigenvectors * np.sqrt(eigenvalues)).T * (noise / np.sqrt(eigenvalues.sum()))
    shape = shape.astype(np.float32)
    similarity = base @ base.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argpartition(-similarity, 10, axis=1)[:, :10]
    out = np.empty((n, dim), dtype=np.float32)
    step = 20_000
    for start in range(0, n, step):
        m = min(step, n - start)
        first = rng.integers(0, len(base), size=m)
        second = neighbours[first, rng.integers(0, 10, size=m)]
        t = rng.uniform(0.0, 0.5, size=(m, 1)).astype(np.float32)
        mix = (1 - t) * base[first] + t * base[second]
        mix /= np.linalg.norm(mix, axis=1, keepdims=True)
        mix += rng.standard_normal((m, dim), dtype=np.float32) @ shape
        out[start : start + m] = mix / np.linalg.norm(mix, axis=1, keepdims=True)
    return out


def neighbour_stats(vectors: np.ndarray, *, sample: int = 300, seed: int = 0) -> dict[str, float]:
    """Mean cosine of a sampled vector to its 1st and 10th nearest neighbour, and to a random one."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False)
    sims = vectors[idx] @ vectors.T
    sims[np.arange(len(idx)), idx] = -np.inf  # not oneself
    top = -np.sort(-np.partition(sims, sims.shape[1] - 10, axis=1)[:, -10:], axis=1)
    others = rng.integers(0, len(vectors), size=len(idx))
    rand = sims[np.arange(len(idx)), others]
    return {
        "nn1": float(top[:, 0].mean()),
        "nn10": float(top[:, 9].mean()),
        "random": float(rand[np.isfinite(rand)].mean()),
    }


def real_base_vectors(embedder, n: int, *, seed: int = 7) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
    """Real embeddings of ``n`` generated chunk texts, cached in bench/results/cache.

    Returns the vectors and the seconds it took to embed them (0 when cached).
    """
    gen = TextGenerator(seed)
    texts = [gen.chunk_text() for _ in range(n)]
    digest = hashlib.sha256(("\n".join(texts) + embedder.model_id).encode()).hexdigest()[:16]
    cache = RESULTS_DIR / "cache" / f"base-{n}-{digest}.npy"
    if cache.exists():
        return np.load(cache), 0.0
    started = time.perf_counter()
    vectors = embedder.embed(texts)
    seconds = time.perf_counter() - started
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors, seconds


def build_snapshot(vectors: np.ndarray, texts: Sequence[str], *, per_file: int = 8, dimension: int = 384):  # type: ignore[no-untyped-def]
    """A ``Snapshot`` holding these vectors and texts, ``per_file`` chunks per file, via ``put_file``."""
    from rag.chunking import chunk_id
    from rag.index import FileRecord, IndexParams, Snapshot
    from rag.types import Chunk

    params = IndexParams(
        embedding_model="all-MiniLM-L6-v2", dimension=dimension, chunk_tokens=200, chunk_overlap=40,
        window=256, chunker="bench",
    )
    snapshot = Snapshot(params=params)
    for f, start in enumerate(range(0, len(texts), per_file)):
        source = f"part-{f % 10}/doc-{f:06d}.md"
        chunks = []
        offset = 0
        for text in texts[start : start + per_file]:
            chunks.append(
                Chunk(
                    id=chunk_id(source, None, offset, text), source=source, text=text, start=offset,
                    end=offset + len(text), headings=("Section",), title="Document",
                )
            )
            offset += len(text) + 2
        record = FileRecord(source, hashlib.sha256(source.encode()).hexdigest(), offset, 0, tuple(c.id for c in chunks))
        snapshot.put_file(record, chunks, vectors[start : start + per_file], list(texts[start : start + per_file]))
    return snapshot


# --- measuring and reporting ------------------------------------------------------------


class Stopwatch:
    """Accumulates wall time per label; ``wrap`` times every call of a function."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, label: str, fn):  # type: ignore[no-untyped-def]
        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started
                self.calls[label] = self.calls.get(label, 0) + 1

        return timed


@contextlib.contextmanager
def instrument_indexing(embedder) -> Iterator[Stopwatch]:  # type: ignore[no-untyped-def]
    """Time the stages of ``sync_index`` by wrapping the functions it calls (restored after).

    Labels: scan, read+parse (``load_bytes``), chunk (``split_documents``), embed (the model,
    ``embed_batch``), put_file, drop_file, load (the previous generation), update_ann, commit.
    """
    import rag.indexing as indexing
    from rag.index import IndexStore, Snapshot

    watch = Stopwatch()
    patches = [
        (indexing, "scan_corpus", "scan"),
        (indexing, "load_bytes", "read+parse"),
        (indexing, "split_documents", "chunk"),
        (Snapshot, "put_file", "put_file"),
        (Snapshot, "drop_file", "drop_file"),
        (Snapshot, "update_ann", "update_ann"),
        (IndexStore, "load", "load"),
        (IndexStore, "commit", "commit"),
        (indexing._VectorCache, "__init__", "vector cache"),
        (embedder, "embed_batch", "embed"),
    ]
    saved = [(owner, name, owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name))
             for owner, name, _ in patches]
    try:
        for owner, name, label in patches:
            setattr(owner, name, watch.wrap(label, getattr(owner, name)))
        yield watch
    finally:
        for owner, name, original in saved:
            if owner is embedder:
                del embedder.embed_batch  # back to the class's method
            else:
                setattr(owner, name, original)


@contextlib.contextmanager
def clock() -> Iterator[dict[str, float]]:
    """Wall and CPU seconds (user + system, all threads) of the block: ``{"wall": .., "cpu": ..}``.

    On a shared machine wall time swings with other load; CPU time much less, so the
    benchmarks report both.
    """
    result: dict[str, float] = {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    wall0 = time.perf_counter()
    try:
        yield result
    finally:
        result["wall"] = time.perf_counter() - wall0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["cpu"] = usage.ru_utime + usage.ru_stime - cpu0


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def machine() -> dict[str, object]:
    """What ran the benchmark, and how busy the machine was (1-minute load average)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats shown as given (format them first)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def add_json_option(parser: argparse.ArgumentParser, name: str) -> None:
    """``--json [PATH]``, as every benchmark takes it (read by ``save_results``)."""
    parser.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                        help=f"write results as JSON (default path: bench/results/{name}-<time>.json)")


def save_results(name: str, payload: dict, path: str | None) -> Path | None:
    """Write ``payload`` (plus the machine and command line) as JSON and say where; ``path``
    '' means the default path, ``None`` (no ``--json``) writes nothing."""
    if path is None:
        return None
    target = Path(path) if path else RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": " ".join(sys.argv), "machine": machine(), **payload}
    target.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"results: {target}", flush=True)
    return target


def chunks_of(files: Sequence[ChunkedFile]) -> Iterator[str]:
    for f in files:
        yield from f.texts
