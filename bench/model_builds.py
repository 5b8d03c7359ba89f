"""Two or more builds of a chat model, same questions, same passages, same prompt: do they answer alike?

    .venv/bin/python -m bench.model_builds .rag/models/qwen2.5-coder-0.5b /tmp/tied --limit 40
    .venv/bin/python -m bench.model_builds A B --dataset ../shared/eval/qa-dev --json out.json

For deciding whether a smaller build of a model (int4 or shared embedding/LM-head weights,
``rag.modelbuild``) loses answer quality. Every build is loaded into one in-process Foundry
Local runtime (``rag.runtime``); each question goes to every build in a rotating order, so a
change in the machine's load hits them alike. Greedy decoding (temperature 0).

The questions are a spread sample of a qa-dev-like set (``questions.jsonl`` with
``question``, ``answers``, ``source``; ``docs/``): every n-th one. The passages are not
retrieved by the app's pipeline but picked from the question's own source article (the
``k`` windows of ~120 words whose stemmed words best match the question, IDF-weighted), so
the comparison measures the models and nothing else. The prompt is fixed here, not the app's.

Reported per build: accuracy (a gold answer contained in the reply as whole tokens after
SQuAD normalisation, citation markers stripped), time to first token and decode tokens/s
(medians), and between each build and the first one: how often both are right or wrong
together and how often the normalised replies are identical.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import string
import sys
import time
from collections import Counter
from pathlib import Path

from rag.keyword import tokenize
from rag.runtime import FoundryRuntime

DATASET = Path(__file__).resolve().parent.parent.parent / "shared" / "eval" / "qa-dev"
PROMPTS = {
    # Reading comprehension alone: what a smaller build could lose.
    "plain": "Answer the question in one short sentence, using only the passages below.",
    # With a citation, as the app asks; small models often reply with the marker alone.
    "cite": (
        "Answer the question using only the numbered passages. Reply with one short sentence that "
        "contains the answer, then the number of the passage it comes from, like [2]."
    ),
}
WINDOW_WORDS = 120


def normalize(text: str) -> str:
    """SQuAD's answer normalisation, after dropping citation markers.

    >>> normalize("The Pacific Ocean [2].")
    'pacific ocean'
    """
    text = re.sub(r"\[\d+\]", " ", text.lower())
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains_answer(reply: str, answers: list[str]) -> bool:
    """A gold answer occurs in the reply as a run of whole tokens.

    >>> contains_answer("It is in Malaysia.", ["Malay"]), contains_answer("in 1832 [1]", ["1832"])
    (False, True)
    """
    tokens = normalize(reply).split()
    for answer in answers:
        gold = normalize(answer).split()
        if gold and any(tokens[i : i + len(gold)] == gold for i in range(len(tokens) - len(gold) + 1)):
            return True
    return False


def windows(text: str, size: int = WINDOW_WORDS) -> list[str]:
    """The article cut into windows of about ``size`` words at sentence ends."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    out: list[str] = []
    current: list[str] = []
    for sentence in sentences:
        current.append(sentence)
        if sum(len(s.split()) for s in current) >= size:
            out.append(" ".join(current))
            current = []
    if current:
        out.append(" ".join(current))
    return out


def best_passages(question: str, text: str, k: int) -> list[str]:
    """The ``k`` windows whose stemmed words best match the question (IDF within the article)."""
    parts = windows(text)
    bags = [set(tokenize(p)) for p in parts]
    df = Counter(term for bag in bags for term in bag)
    terms = set(tokenize(question))

    def score(i: int) -> float:
        return sum(math.log(1 + len(parts) / df[t]) for t in terms if t in bags[i])

    ranked = sorted(range(len(parts)), key=lambda i: (-score(i), i))[:k]
    return [parts[i] for i in sorted(ranked)]  # in article order


def load_questions(dataset: Path, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in (dataset / "questions.jsonl").read_text(encoding="utf-8").splitlines()]
    step = max(1, len(rows) // limit)
    return rows[::step][:limit]


def ask(runtime: FoundryRuntime, model_id: str, messages: list[dict[str, str]], max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    pieces: list[str] = []
    with runtime.stream_chat(model_id, messages, max_tokens=max_tokens, temperature=0) as stream:
        for piece in stream:
            if first is None:
                first = time.perf_counter()
            pieces.append(piece)
        usage = stream.usage
    ended = time.perf_counter()
    tokens = usage.completion_tokens if usage else len(pieces)
    decode = (tokens - 1) / (ended - first) if first is not None and tokens > 1 and ended > first else 0.0
    return {
        "reply": "".join(pieces),
        "ttft_s": (first or ended) - started,
        "decode_tps": decode,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dirs", nargs="+", type=Path, help="built model folders; the first is the reference")
    parser.add_argument("--dataset", type=Path, default=DATASET)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("-k", type=int, default=3, help="passages per question")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt", choices=sorted(PROMPTS), default="plain", help="the system prompt")
    parser.add_argument("--data-dir", type=Path, default=Path(".rag/bench-model-builds"))
    parser.add_argument("--json", type=Path, help="write every reply here")
    args = parser.parse_args(argv)

    questions = load_questions(args.dataset, args.limit)
    runtime = FoundryRuntime(args.data_dir)
    try:
        ids = []
        for path in args.model_dirs:
            started = time.perf_counter()
            ids.append(runtime.load(path))
            print(f"loaded {ids[-1]} from {path} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        for model_id in ids:  # untimed warm-up
            ask(runtime, model_id, [{"role": "user", "content": "Say hello."}], 4)
        results: dict[str, list[dict]] = {m: [] for m in ids}
        for n, row in enumerate(questions):
            text = (args.dataset / "docs" / row["source"]).read_text(encoding="utf-8")
            passages = best_passages(row["question"], text, args.k)
            context = "\n\n".join(f"[{i}] {p}" for i, p in enumerate(passages, start=1))
            messages = [
                {"role": "system", "content": PROMPTS[args.prompt]},
                {"role": "user", "content": f"Passages:\n{context}\n\nQuestion: {row['question']}"},
            ]
            in_passages = contains_answer(context, row["answers"])
            for model_id in ids[n % len(ids) :] + ids[: n % len(ids)]:
                answer = ask(runtime, model_id, messages, args.max_tokens)
                answer.update(id=row["id"], correct=contains_answer(answer["reply"], row["answers"]),
                              answer_in_passages=in_passages)  # fmt: skip
                results[model_id].append(answer)
            print(f"{n + 1}/{len(questions)} {row['id']}", file=sys.stderr)
    finally:
        runtime.close()

    for rows in results.values():
        rows.sort(key=lambda r: r["id"])
    reference = results[ids[0]]
    ceiling = sum(r["answer_in_passages"] for r in reference)
    print(f"{len(questions)} questions from {args.dataset}, k={args.k}, prompt {args.prompt!r}; "
          f"answer in the passages: {ceiling}")  # fmt: skip
    print("| build | correct | same verdict as first | identical reply | median TTFT (s) | median decode tok/s | "
          "median prompt tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for model_id, path in zip(ids, args.model_dirs):
        rows = results[model_id]
        same = sum(a["correct"] == b["correct"] for a, b in zip(rows, reference))
        identical = sum(normalize(a["reply"]) == normalize(b["reply"]) for a, b in zip(rows, reference))
        print(
            f"| {path} | {sum(r['correct'] for r in rows)}/{len(rows)} | {same}/{len(rows)} | {identical}/{len(rows)} "
            f"| {statistics.median(r['ttft_s'] for r in rows):.2f} "
            f"| {statistics.median(r['decode_tps'] for r in rows):.1f} "
            f"| {statistics.median(r['prompt_tokens'] or 0 for r in rows):.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({str(p): results[m] for m, p in zip(ids, args.model_dirs)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
