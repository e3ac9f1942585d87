"""The forgetting guard, measured: the identity quickstart with replay off and on.

Each variant runs ``ftkit train configs/quickstart.yaml`` (the shipped identity data, ftkit's defaults)
in a fresh process, timed end to end, with a fresh answer cache so the self-replay generation is
included. Then the trained adapter answers:
- ten identity questions phrased unlike the training data (``IDENTITY_PROBES``), once with no system
  prompt (the template inserts its default) and once with a system prompt none of the training
  examples used; a hit names the new name (or maker);
- the held-out general questions: "general answers kept" is read from train_results.json (the rule is
  in ``ftkit/guard/general_check.py``).

    python bench/forgetting.py                       # replay off vs. on (the quickstart's defaults)
    python bench/forgetting.py --set learning_rate=5e-4 --set num_train_epochs=6   # any override
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart.yaml"
UNSEEN_SYSTEM = "You are a knowledgeable assistant. Keep your answers short."


def probe(adapter: Path, name: str, author: str) -> dict[str, int]:
    """Identity hits of the adapter without and with a system prompt."""
    import yaml

    from ftkit.chat import load_chat_model
    from ftkit.engine.replies import generate_replies
    from ftkit.guard.general_check import IDENTITY_PROBES, identity_hits

    base = yaml.safe_load(CONFIG.read_text())["model_name_or_path"]
    model, tokenizer = load_chat_model(base, [str(adapter)])
    hits = {}
    for label, system in (("no system", None), ("system", UNSEEN_SYSTEM)):
        conversations = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
                         for q, _ in IDENTITY_PROBES]
        replies = generate_replies(model, tokenizer, conversations, max_new_tokens=48, batch_size=len(conversations))
        hits[label] = identity_hits([r.text for r in replies], name, author)
    return hits


def run(label: str, overrides: list[str], workdir: Path) -> dict:
    import yaml

    output_dir = workdir / label.replace(" ", "_")
    env = {**os.environ, "FTKIT_HOME": str(workdir / "home")}
    shared = Path(os.environ.get("FTKIT_HOME", Path.home() / ".cache" / "ftkit")) / "models"
    (workdir / "home").mkdir(exist_ok=True)
    if shared.is_dir() and not (workdir / "home" / "models").exists():  # reuse the converted model, not answers
        (workdir / "home" / "models").symlink_to(shared)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ftkit", "train", str(CONFIG), f"output_dir={output_dir}", *overrides],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    (workdir / "home" / "answers").exists() and subprocess.run(["rm", "-rf", str(workdir / "home" / "answers")])
    metrics = json.loads((output_dir / "train_results.json").read_text())
    config = yaml.safe_load(CONFIG.read_text())
    hits = probe(output_dir, config["identity_name"], config["identity_author"])
    return {"label": label, "seconds": seconds, "train_s": metrics["train_runtime_seconds"], "hits": hits,
            "kept": f"{metrics.get('general_answers_kept')}/{metrics.get('general_answers_base_right')}",
            "leaks": metrics.get("general_identity_leaks"), "replay": metrics.get("replay_examples"),
            "loss": metrics["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], help="a config override for both runs, key=value")
    parser.add_argument("--only", choices=["off", "on"], help="run one variant")
    args = parser.parse_args()
    variants = [("replay off", ["replay_ratio=0"]), ("replay on", [])]
    if args.only:
        variants = [v for v in variants if v[0].endswith(args.only)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in variants:
            rows.append(run(label, [*overrides, *args.set], Path(tmp)))
            print(f"finished {label}", file=sys.stderr, flush=True)
    print(f"quickstart {' '.join(args.set)}".strip())
    print(f"{'variant':<12}{'replay':>8}{'identity (no sys)':>19}{'identity (sys)':>16}{'general kept':>14}"
          f"{'leaks':>7}{'loss':>8}{'train s':>9}{'total s':>9}")
    for r in rows:
        print(f"{r['label']:<12}{r['replay']:>8}{r['hits']['no system']:>16}/10{r['hits']['system']:>13}/10"
              f"{r['kept']:>14}{r['leaks']:>7}{r['loss']:>8.3f}{r['train_s']:>9.0f}{r['seconds']:>9.0f}")


if __name__ == "__main__":
    main()
