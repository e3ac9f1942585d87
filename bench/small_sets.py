"""Small sets, learned or not: hand-written calibration sets trained with the old defaults and with ftkit's own.

The sets live in ``bench/small_sets/`` (registered in its ``dataset_info.json``, kept out of the shipped
``data/``): four identity sets with names and makers the shipped data does not contain (alpaca without a
system prompt, sharegpt under "You are a helpful assistant.", Chinese, multi-turn) and one task set (JSON
extraction). Their held-out probes, phrased unlike the training questions, are in ``probes.json``.

For each (set, variant) this runs ``ftkit train`` in a fresh process into ``WORK/<set>/<variant>/output``
(its config.yaml, train.log and probe_answers.json beside it) and reports: examples in the set, epochs actually run, wall seconds of the whole command, the learned check and
"general answers kept" as train_results.json has them ("-" where a key is absent), and the held-out probes,
answered greedily in this process by the base model with the trained adapter merged:
- identity sets: name probes whose answer contains the name, author probes whose answer contains the maker
  (case-insensitive substring), asked with no system prompt (the template's default applies) and, for sets
  trained under one, with the set's own system prompt;
- json_extract: held-out texts whose answer parses to exactly the expected JSON object.

Variants: ``old`` writes out ftkit's defaults before issue 19 (lr 1e-4, 3 epochs, rank 8, batch 4);
``defaults`` gives only the model, stage, method, dataset, dataset_dir and output_dir, so whatever ftkit's
defaults are when it runs. ``--variant NAME:key=value,...`` adds a variant on top of ``defaults``; ``--set
key=value`` is passed to every run as a command-line override.

Each run gets its own answer cache (``FTKIT_HOME`` under WORK, the converted models shared), so every wall
time includes the base-model answers a new user's first run generates; ``--reuse-answers`` uses your own
``FTKIT_HOME`` instead (faster, but the first run then pays for the rest).

    python bench/small_sets.py                                      # every set, old vs. defaults
    python bench/small_sets.py --sets id_zh,json_extract --variants defaults
    python bench/small_sets.py --variant lr3e-4:learning_rate=3e-4,lora_rank=16   # old, defaults and lr3e-4
    python bench/small_sets.py --sets id_multiturn --variants defaults --set max_steps=2 --reuse-answers  # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SETS_DIR = ROOT / "bench" / "small_sets"
PROBES = json.loads((SETS_DIR / "probes.json").read_text(encoding="utf-8"))
ALL_SETS = list(PROBES)
BASE_MODEL = "smollm2-135m-instruct"  # the embedded default
MAX_NEW_TOKENS = 48
OLD_DEFAULTS = {"learning_rate": 1e-4, "num_train_epochs": 3, "lora_rank": 8, "per_device_train_batch_size": 4}
BUILT_IN_VARIANTS = {"old": OLD_DEFAULTS, "defaults": {}}


def parse_assignments(text: str) -> dict[str, Any]:
    """``key=value,key=value`` as a dict, values read as YAML scalars; a piece without ``=`` continues the
    previous value (``lora_target=q_proj,v_proj``)."""
    pieces: list[str] = []
    for piece in text.split(","):
        if "=" in piece or not pieces:
            pieces.append(piece)
        else:
            pieces[-1] += "," + piece
    assignments = {}
    for piece in pieces:
        key, sep, value = piece.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"cannot read '{piece}' in '{text}': write key=value")
        assignments[key.strip()] = yaml.safe_load(value)
    return assignments


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,...`` -> (NAME, its keys on top of ``defaults``)."""
    name, sep, assignments = spec.partition(":")
    if not sep or not name or not assignments:
        raise SystemExit(f"--variant {spec}: write NAME:key=value[,key=value...]")
    return name, parse_assignments(assignments)


def run_config(set_name: str, variant_keys: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """The YAML a run trains with: the keys every new user writes, then the variant's."""
    return {"model_name_or_path": BASE_MODEL, "stage": "sft", "finetuning_type": "lora", "dataset": set_name,
            "dataset_dir": str(SETS_DIR), "output_dir": str(output_dir), **variant_keys}


def isolated_home(work: Path) -> Path:
    """An FTKIT_HOME with no cached answers that shares the converted models of the caller's own."""
    home = work / "home"
    shutil.rmtree(home / "answers", ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    shared = Path(os.environ.get("FTKIT_HOME", Path.home() / ".cache" / "ftkit")).expanduser() / "models"
    if shared.is_dir() and not (home / "models").exists():
        (home / "models").symlink_to(shared)
    return home


def train(config: dict[str, Any], run_dir: Path, overrides: list[str], home: Path | None) -> tuple[float, int]:
    """``ftkit train`` on ``config`` in a fresh process, config and log in ``run_dir`` (beside the output_dir,
    which ftkit wants new or its own): wall seconds, exit code."""
    shutil.rmtree(run_dir, ignore_errors=True)  # ftkit resumes from a checkpoint in output_dir: start clean
    run_dir.mkdir(parents=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    ftkit = Path(sys.executable).with_name("ftkit")
    command = [str(ftkit)] if ftkit.is_file() else [sys.executable, "-m", "ftkit"]
    env = {**os.environ, "FTKIT_HOME": str(home)} if home else None
    started = time.perf_counter()
    with (run_dir / "train.log").open("w", encoding="utf-8") as log:
        code = subprocess.run([*command, "train", str(config_path), *overrides], env=env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return time.perf_counter() - started, code


def answer(adapter: Path, conversations: list[list[dict[str, str]]]) -> list[str]:
    """Greedy answers of the base model with ``adapter`` merged, as the run's resolved config loads it."""
    from ftkit.engine.replies import generate_replies
    from ftkit.models import load_for_inference

    resolved = yaml.safe_load((adapter / "ftkit_config.yaml").read_text(encoding="utf-8"))
    loaded = load_for_inference(resolved["model_name_or_path"], [adapter], template=resolved.get("template", "auto"))
    replies = generate_replies(loaded.model, loaded.tokenizer, conversations, max_new_tokens=MAX_NEW_TOKENS,
                               batch_size=len(conversations))
    del loaded
    gc.collect()
    return [reply.text for reply in replies]


def probe_identity(adapter: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Name and author hits on the held-out probes, with no system prompt and with the set's own (if any)."""
    systems = {"no system": None} | ({"system": spec["system"]} if spec["system"] else {})
    expected = {"name": spec["name"].lower(), "author": spec["author"].lower()}
    conversations, asked = [], []
    for label, system in systems.items():
        for probe in spec["probes"]:
            prefix = [{"role": "system", "content": system}] if system else []
            conversations.append([*prefix, {"role": "user", "content": probe["question"]}])
            asked.append((label, probe))
    result: dict[str, Any] = {label: {"name": [0, 0], "author": [0, 0]} for label in systems}
    answers = []
    for (label, probe), text in zip(asked, answer(adapter, conversations), strict=True):
        hit = expected[probe["expects"]] in text.lower()
        result[label][probe["expects"]][0] += hit
        result[label][probe["expects"]][1] += 1
        answers.append({"system": label, **probe, "answer": text, "hit": hit})
    return {"hits": result, "answers": answers}


def first_json_object(text: str) -> Any:
    """The JSON value that starts at the answer's first ``{``, or None when there is none that parses."""
    start = text.find("{")
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0] if start >= 0 else None
    except json.JSONDecodeError:
        return None


def probe_json(adapter: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Held-out extraction items whose answer parses to exactly the expected object (no system prompt)."""
    from ftkit.data.formats import records_to_conversations
    from ftkit.data.registry import resolve_dataset

    records = [{"instruction": spec["instruction"], "input": item["input"], "output": "-"} for item in spec["heldout"]]
    conversations, _ = records_to_conversations(records, resolve_dataset("json_extract", SETS_DIR))
    prompts = [conversation[:-1] for conversation in conversations]  # rendered as training renders them
    answers = []
    for item, text in zip(spec["heldout"], answer(adapter, prompts), strict=True):
        answers.append({**item, "answer": text, "exact": first_json_object(text) == item["expected"]})
    return {"exact": [sum(a["exact"] for a in answers), len(answers)], "answers": answers}


def measure(set_name: str, variant: str, variant_keys: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One row: train the set with the variant, read train_results.json, ask the held-out probes."""
    run_dir = args.work / set_name / variant
    home = None if args.reuse_answers else isolated_home(args.work)
    output_dir = run_dir / "output"
    config = run_config(set_name, variant_keys, output_dir)
    seconds, code = train(config, run_dir, args.set, home)
    examples = len(json.loads((SETS_DIR / f"{set_name}.json").read_text(encoding="utf-8")))
    row: dict[str, Any] = {"set": set_name, "variant": variant, "examples": examples, "seconds": round(seconds, 1),
                           "config": config, "overrides": args.set, "exit_code": code}
    results_file = output_dir / "train_results.json"
    if code != 0 or not results_file.is_file():
        print(f"{set_name}/{variant}: ftkit train failed (exit {code}); see {run_dir / 'train.log'}", file=sys.stderr)
        return row
    results = json.loads(results_file.read_text(encoding="utf-8"))
    row["train_results"] = results
    spec = PROBES[set_name]
    row["probes"] = probe_json(output_dir, spec) if "heldout" in spec else probe_identity(output_dir, spec)
    (run_dir / "probe_answers.json").write_text(json.dumps(row["probes"]["answers"], ensure_ascii=False, indent=2),
                                                encoding="utf-8")
    return row


def ratio(results: dict[str, Any], got: str, of: str) -> str:
    return f"{results[got]}/{results[of]}" if got in results and of in results else "-"


def probe_cells(row: dict[str, Any]) -> tuple[str, str]:
    """(no system prompt, the set's system prompt) cells: 'name n/N, maker m/M', or 'k/15 exact'."""
    probes = row.get("probes")
    if probes is None:
        return "-", "-"
    if "exact" in probes:
        return f"{probes['exact'][0]}/{probes['exact'][1]} exact", "-"
    cells = [f"name {h['name'][0]}/{h['name'][1]}, maker {h['author'][0]}/{h['author'][1]}"
             for h in probes["hits"].values()]
    return cells[0], cells[1] if len(cells) > 1 else "-"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| set | variant | examples | epochs | wall s | learned | general kept | probes, no system "
             "| probes, set's system |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for row in rows:
        results = row.get("train_results")
        if results is None:
            lines.append(f"| {row['set']} | {row['variant']} | {row['examples']} | failed (exit {row['exit_code']}) "
                         f"| {row['seconds']:.0f} | - | - | - | - |")
            continue
        no_system, system = probe_cells(row)
        epochs = f"{results['epoch']:g}" if isinstance(results.get("epoch"), (int, float)) else "-"
        lines.append(f"| {row['set']} | {row['variant']} | {row['examples']} | {epochs} | {row['seconds']:.0f} "
                     f"| {ratio(results, 'learned_answers', 'learned_checked')} "
                     f"| {ratio(results, 'general_answers_kept', 'general_answers_base_right')} "
                     f"| {no_system} | {system} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(ALL_SETS), help=f"comma-separated, from: {', '.join(ALL_SETS)}")
    parser.add_argument("--limit-sets", type=int, metavar="N", help="run only the first N of the chosen sets")
    parser.add_argument("--variants", help="comma-separated variant names (default: old, defaults and every --variant)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                        help="an ad-hoc variant: these keys on top of `defaults` (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="key=value",
                        help="an override passed to every run (repeatable)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ftkit-small-sets"),
                        help="where runs, logs and results.json go")
    parser.add_argument("--reuse-answers", action="store_true",
                        help="use your own FTKIT_HOME (cached base answers) instead of a fresh answer cache per run")
    args = parser.parse_args()
    args.work = args.work.resolve()

    variants = dict(BUILT_IN_VARIANTS) | dict(parse_variant(spec) for spec in args.variant)
    chosen = args.variants.split(",") if args.variants else list(variants)
    sets = [s for s in args.sets.split(",") if s][:args.limit_sets]
    unknown = [s for s in sets if s not in PROBES] + [v for v in chosen if v not in variants]
    if unknown:
        raise SystemExit(f"unknown set or variant: {', '.join(unknown)}; sets: {', '.join(ALL_SETS)}; "
                         f"variants: {', '.join(variants)}")
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set {item}: write key=value")

    rows = []
    for set_name in sets:
        for variant in chosen:
            print(f"training {set_name} / {variant} ...", file=sys.stderr, flush=True)
            rows.append(measure(set_name, variant, variants[variant], args))
            print(markdown_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    table = markdown_table(rows)
    print(table)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps({"table": table, "rows": rows}, ensure_ascii=False, indent=2),
                                            encoding="utf-8")
    print(f"\nwritten: {args.work / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
