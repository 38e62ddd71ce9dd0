"""Build the data of slm's local evaluation tasks from the vendored corpora, deterministically.

    python scripts/build_eval_tasks.py           # (re)write slm_cli/evaluate/tasks/*/test.jsonl
    python scripts/build_eval_tasks.py --check   # exit 1 if the committed files differ from a fresh build

No randomness beyond a seeded `random.Random`, no dependency beyond the standard library: the same
corpus gives the same bytes on any machine (tests/test_harness.py runs `--check`). The tasks, their
sources and licences are described in slm_cli/evaluate/tasks/README.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "corpora"
TASKS = ROOT / "slm_cli" / "evaluate" / "tasks"
N_EXAMPLES = 300


def evenly(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them if there are fewer), in order."""
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


# ---- wikitext2_lastword: LAMBADA-style last-word prediction ---------------------------------------

SENTENCE_END = {".", "!", "?"}
MIN_WORDS, MAX_WORDS = 30, 150  # a passage long enough to give context, short enough for small models


def lastword_examples(text: str) -> list[dict]:
    """One passage per paragraph of WikiText-2 test: the paragraph up to the end of its last sentence
    that ends between words MIN_WORDS and MAX_WORDS; the target is that sentence's last word (an
    alphabetic word, so never `<unk>`, a number or punctuation), the context every word before it."""
    candidates = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):  # blank lines and headings (` = Title = `)
            continue
        words = line.split(" ")
        ends = [i for i, w in enumerate(words) if w in SENTENCE_END and MIN_WORDS <= i <= MAX_WORDS]
        ends = [i for i in ends if words[i - 1].isalpha() and len(words[i - 1]) > 1]
        if ends:
            end = ends[-1]
            candidates.append({"context": " ".join(words[: end - 1]), "target": " " + words[end - 1]})
    return evenly(candidates, N_EXAMPLES)


# ---- shakespeare_nextline: multiple-choice next line -----------------------------------------------

N_CHOICES = 4
MIN_LINES = 4  # the speaker's name is followed by at least this many lines, the last one is the answer
MAX_CONTEXT_LINES = 8


def _speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker line, its lines) for every speech: blocks separated by a blank line, starting `Name:`."""
    speeches = []
    for block in text.split("\n\n"):
        lines = [line for line in block.strip("\n").split("\n") if line.strip()]
        if len(lines) >= 2 and lines[0].endswith(":"):
            speeches.append((lines[0], lines[1:]))
    return speeches


def nextline_examples(text: str, seed: int = 0) -> list[dict]:
    """Context: a speech without its last line (the speaker's name and up to MAX_CONTEXT_LINES lines);
    choices: its true last line and N_CHOICES - 1 last lines of other speeches, of a similar length
    (0.67x to 1.5x), so that length alone does not give the answer away."""
    speeches = _speeches(text)
    pool = [(i, lines[-1]) for i, (_, lines) in enumerate(speeches)]
    chosen = evenly([i for i, (_, lines) in enumerate(speeches) if len(lines) >= MIN_LINES], N_EXAMPLES)
    rng = random.Random(seed)
    examples = []
    for i in chosen:
        speaker, lines = speeches[i]
        answer = lines[-1]
        similar = [line for j, line in pool
                   if abs(j - i) > 5 and line != answer and 2 * len(answer) <= 3 * len(line) <= 4.5 * len(answer)]
        distractors: list[str] = []
        for line in rng.sample(similar, min(len(similar), 3 * N_CHOICES)):
            if line not in distractors:
                distractors.append(line)
        choices = [answer, *distractors[: N_CHOICES - 1]]
        if len(choices) < N_CHOICES:
            continue
        rng.shuffle(choices)
        context = "\n".join([speaker, *lines[:-1][-MAX_CONTEXT_LINES:]])
        examples.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return examples


BUILDS = {
    "wikitext2_lastword": ("wikitext-2/test.txt", lastword_examples),
    "shakespeare_nextline": ("tinyshakespeare/input.txt", nextline_examples),
}


def render(examples: list[dict]) -> bytes:
    return "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in examples).encode("utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args()
    stale = []
    for task, (corpus, build) in BUILDS.items():
        data = render(build((CORPORA / corpus).read_text(encoding="utf-8")))
        path = TASKS / task / "test.jsonl"
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            n = data.count(b"\n")
            print(f"{path.relative_to(ROOT)}: {n} examples from corpora/{corpus}")
    if stale:
        print(f"stale: {', '.join(stale)}: run python scripts/build_eval_tasks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
