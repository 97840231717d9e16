"""The miniature world's whole chain, measured: mini backbones, Kosmos-G stages 1-3, the
AlignerNet-without-encoder ablation and the held-out evaluation, ending in a results table and a
figure (docs/REPRODUCTION.md, docs/reproduce_mini.png) and one MLflow run holding both.

    kosmos-g local up && eval "$(kosmos-g local env)"
    .venv/bin/python bench/reproduce_mini.py                 # the chain, then the evaluation
    .venv/bin/python bench/reproduce_mini.py --evaluate-only # the registered models, evaluated again

Every step is the platform's own job, submitted as a user would (`ray job submit -- python
pipelines/<step>.py --preset mini`, construction with `--preset world`); a step whose exact config
is already registered is reused by the job itself. One job at a time: the local stack's Ray head
has 2 CPUs, and two Ray Data streams side by side can starve each other's read tasks. The models evaluated, on the same held-out cases and the same noise:

- `full`: the stage-3 model (`kosmos-g`), and its text-only twin prompts (the subject never shown);
- any registered stage 3 from the same start whose background-removed entity images were filled
  otherwise (`--set data.removed_background=random|colours`; the preset's is white, as released);
- `stage 2 only`: the `kosmos-g-align` version stage 3 started from;
- `no encoder`: stage 2 again with `aligner.encoder_layers=0` (the paper's Table 2 ablation),
  not registered (so no later stage starts from it) and evaluated from its run;
- the ceiling: the mini decoder `full` trained on, told the same held-out cases in words (not a
  Kosmos-G model: what the frozen decoder draws when asked exactly).

Every model is also told the one-subject cases in words (`a red star on a purple background`):
text-to-image through the MLLM and AlignerNet, which is how the paper's Table 2 compares stage 2
with and without the AlignerNet encoder (beside SD told the captions: here the decoder's ceiling).

Job logs go to bench/results/reproduce_mini/<step>.log; wall time and the machine's peak memory
use are measured and printed with the table. A job that reused a registered version also reports
how long that version's run took to train (`tracking.active_seconds`, from its MLflow records).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import shape_transfer  # noqa: E402
RESULTS = ROOT / "bench" / "results" / "reproduce_mini"
DOC, FIGURE = ROOT / "docs" / "REPRODUCTION.md", ROOT / "docs" / "reproduce_mini.png"
BEGIN, END = "<!-- reproduce_mini:begin -->", "<!-- reproduce_mini:end -->"
ABLATION_NAME = "align-mini-no-encoder"
# The line a stage or backbone job prints when it reuses a registered version, e.g.
# "[instruct] kosmos-g/4 was trained with this config from the same start: reused".
REUSED = re.compile(r"^\[[\w-]+\] (\S+/\d+) was trained with this config")
ABLATION = ["--set", "model.aligner.encoder_layers=0", "--set", "register=false"]
FILL_LABELS = {"white": "white fill (as released)", "random": "random-RGB fill", "colours": "world-colour fill"}
TARGETS = {"world_single_colour": ("one subject: its colour", 0.8), "world_single_shape": ("its shape", 0.6),
           "world_single_background": ("the asked background", 0.8),
           "world_pair_both_colours": ("two subjects: both colours", 0.6)}


class PeakMemory:
    """The machine's used memory, sampled every second in a thread; `peak_gb` above the start."""

    def __init__(self):
        import psutil

        self._used = lambda: psutil.virtual_memory().used
        self.start, self.peak, self._stop = self._used(), 0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop.wait(1.0):
            self.peak = max(self.peak, self._used())

    @property
    def peak_gb(self) -> float:
        return max(0, self.peak - self.start) / 2**30

    def stop(self):
        self._stop.set()


def stack_env_missing() -> bool:
    """True, with the error printed, unless this shell has the local stack's environment (the
    bench scripts that submit jobs to it or read its registry)."""
    if os.environ.get("RAY_ADDRESS") and os.environ.get("MLFLOW_TRACKING_URI"):
        return False
    print('error: run `kosmos-g local up` and `eval "$(kosmos-g local env)"` first', file=sys.stderr)
    return True


def submit(step: str, script: str, args: list[str], results: Path = RESULTS) -> dict:
    """`ray job submit` one job through main-job.sh's `submit` (which fails unless the job
    SUCCEEDED: a stopped job exits `ray job submit` with 0), its log to `results`/<step>.log,
    progress lines echoed; returns the JSON summary line the job prints last and the wall time."""
    results.mkdir(parents=True, exist_ok=True)
    # The local stack's head runs entrypoints from the checkout (no upload), as the README's commands do.
    entrypoint = ["python", script, *args]
    command = ["bash", "-c", 'source infra/local/submit.sh && submit "$@"', "submit", *entrypoint]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    print(f"[reproduce] {step}: {' '.join(entrypoint)}", flush=True)
    started, summary, reused = time.monotonic(), {}, None
    with open(results / f"{step}.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        for line in process.stdout:
            log.write(line)
            text = line.rsplit("\x1b[0m", 1)[-1].strip()  # Ray's coloured "(worker pid=…)" prefix
            if text.startswith("{") and text.endswith("}"):
                try:
                    summary = json.loads(text)
                except json.JSONDecodeError:
                    pass
            if text.startswith("submit:") or text.startswith("[") and ("step" in text or "done" in text
                                                                   or "reused" in text):
                print(f"  {text[:160]}", flush=True)
            if match := REUSED.search(text):
                reused = match.group(1)  # kept apart: a stage's JSON summary comes after this line
        process.wait()
    if process.returncode != 0:
        raise SystemExit(f"[reproduce] {step} did not succeed (exit {process.returncode}); see {results / step}.log")
    summary["wall_s"] = time.monotonic() - started
    if reused:
        summary["reused"], summary["trained_s"] = reused, trained_seconds(reused)
    print(f"[reproduce] {step} finished in {summary['wall_s'] / 60:.1f} min", flush=True)
    return summary


def trained_seconds(version: str) -> float:
    """How long the run behind a registered "name/version" took to train (its working sessions,
    from MLflow's records), for a job that reused it."""
    from kosmos_g.platform import tracking

    name, number = version.rsplit("/", 1)
    return tracking.active_seconds(tracking.client().get_model_version(name, number).run_id)


def timing(jobs: dict[str, dict]) -> str:
    """Each job's wall time; a reused job's own training time beside it, and both chains' sums."""
    parts = [f"{step} {summary['wall_s'] / 60:.1f} min"
             + (f" (reused {summary['reused']}, trained in {summary['trained_s'] / 60:.1f})"
                if "trained_s" in summary else "")
             for step, summary in jobs.items()]
    text = ", ".join(parts)
    if any("trained_s" in summary for summary in jobs.values()):
        as_trained = sum(summary.get("trained_s", summary["wall_s"]) for summary in jobs.values())
        text += f"; these jobs as they trained ≈ {as_trained / 60:.0f} min"
    return text


def train_chain() -> dict[str, dict]:
    jobs = {}
    for step in ("mini_clip", "mini_text_clip", "mini_decoder", "construct", "pretrain", "align"):
        jobs[step] = submit(step, f"pipelines/{step}.py", ["--preset", "world" if step == "construct" else "mini"])
    jobs["instruct"] = submit("instruct", "pipelines/instruct.py", ["--preset", "mini"])
    jobs["align_no_encoder"] = submit("align_no_encoder", "pipelines/align.py",
                                      ["--preset", "mini", *ABLATION, "--set", f"name={ablation_name()}"])
    return jobs


def stage3_versions() -> list[tuple[str, str, str, str, str]]:
    """(version URI, `init` tag, removed_background, steps, mini CLIP) of every registered `kosmos-g`,
    newest first (runs from before the fill option existed trained on white)."""
    from kosmos_g.platform import tracking

    found = []
    for version in tracking.client().search_model_versions("name = 'kosmos-g'"):
        params = tracking.client().get_run(version.run_id).data.params
        found.append((int(version.version), version.tags.get("init", ""),
                      params.get("data.removed_background", "white"), params.get("train.steps", "?"),
                      params.get("model.mllm.vision.pretrained_path", "")))
    return [(f"models:/kosmos-g/{n}", *rest) for n, *rest in sorted(found, reverse=True)]


def models_to_evaluate(jobs: dict[str, dict]) -> dict[str, str]:
    """full: the newest `kosmos-g` trained with the mini preset's fill; for each other fill, the
    newest from the same start; stage 2 only: that start (the versions' `init` tag)."""
    from kosmos_g.platform.train.config import stage_presets

    preset_fill = stage_presets(3).get("mini").data.removed_background
    versions = stage3_versions()
    full = next(((uri, init, clip) for uri, init, fill, _, clip in versions if fill == preset_fill), None)
    if full is None:
        raise SystemExit("no registered kosmos-g trained as `instruct.py --preset mini` does: run the chain first")
    full_uri, started_from, full_clip = full
    if not started_from.startswith("models:/kosmos-g-align/"):
        raise SystemExit(f"{full_uri} did not start from a registered stage-2 model (init: {started_from!r})")
    models = {"full": full_uri}
    # Stage 3 from the same start with the other fills of background-removed entity images, when
    # registered (tried on 2026-12-01 with `--set data.removed_background=…`).
    for other in (fill for fill in FILL_LABELS if fill != preset_fill):
        found = next(((uri, steps) for uri, init, fill, steps, _ in versions if fill == other and init == started_from),
                     None)
        if found:
            models[f"{FILL_LABELS[other]}, {found[1]} steps"] = found[0]
    # The newest full model of each earlier mini CLIP (its vision tower), to show what the backbone changed.
    earlier: dict[str, str] = {}
    for uri, _, fill, _, clip in versions:
        if fill == preset_fill and clip and clip != full_clip:
            earlier.setdefault(clip, uri)
    for clip, uri in earlier.items():
        models[f"full on {clip.removeprefix('models:/')}"] = uri
    models["stage 2 only"] = started_from
    ablation = jobs.get("align_no_encoder", {}).get("run_id") or ablation_run(started_from)
    if ablation:
        models["no encoder"] = f"runs:/{ablation}/model"
    return models


def ablation_name() -> str:
    """The ablation's job name carries the stage-1 version it starts from (the newest), so a chain
    rerun on another stage 1 trains a new run instead of being refused the old one's checkpoints."""
    from kosmos_g.platform import tracking

    start = tracking.pin_model_uri("models:/kosmos-g-pretrain/latest")
    return f"{ABLATION_NAME}-pretrain-{start.rsplit('/', 1)[1]}"


def ablation_run(stage2_uri: str) -> str | None:
    """The newest finished no-encoder stage 2 that started where `stage2_uri` (a registered
    kosmos-g-align version) started, so that it compares like with like; None when there is none."""
    from kosmos_g.platform import tracking

    client = tracking.client()
    name, version = stage2_uri.removeprefix("models:/").split("/")
    start = client.get_run(client.get_model_version(name, version).run_id).data.tags.get("init_uri")
    experiment = client.get_experiment_by_name(tracking.experiment_name("align"))
    if not start or experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"params.`model.aligner.encoder_layers` = '0' and tags.init_uri = '{start}'"
                                            " and attributes.status = 'FINISHED'")
    return runs[0].info.run_id if runs else None


def evaluate(models: dict[str, str], singles: int, pairs: int) -> dict[str, dict]:
    results = {}
    for label, uri in models.items():
        step = "evaluate_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", label)  # a log file name: no "/" of a model URI
        results[label] = submit(step, "pipelines/evaluate.py", [
            "--preset", "world", "--model", uri, "--set", f"singles={singles}", "--set", f"pairs={pairs}",
            "--set", "words=true"])
    return results


def decoder_ceiling(model_uri: str, singles: int) -> tuple[str, dict, dict] | None:
    """(decoder URI, metrics, its shape readings) of the mini decoder `model_uri` was trained on,
    prompted with the evaluation's own held-out cases in words (`a red star on a purple
    background`): what the frozen decoder draws when told exactly, the most the image-prompted
    model can be expected to reach; the readings also hold its VAE's on each case's answer
    (`shape_transfer.decoder_readings`)."""
    decoder = shape_transfer.decoder_of(model_uri)
    if not decoder.startswith("models:/"):
        print(f"[reproduce] {model_uri} names no registered decoder ({decoder!r}): no ceiling row", flush=True)
        return None
    print(f"[reproduce] {decoder} prompted with the held-out cases in words", flush=True)
    return (decoder, *shape_transfer.decoder_readings(decoder, singles))


def table(results: dict[str, dict], ceiling: tuple[str, dict, dict] | None = None) -> list[str]:
    """Markdown rows: each model's one-subject and two-subject metrics, the text-only twins, each
    model told the cases in words, and the decoder's ceiling (told the same words)."""

    def cells(metrics: dict, kind: str, with_pairs: bool) -> str:
        def value(key: str, clip: bool = False) -> str:
            found = metrics.get(key) if (with_pairs or "pair" not in key) else None
            return "–" if found is None else f"{found:.1f}" if clip else f"{found:.2f}"

        images = metrics.get(f"world_{kind}_images", 0) + (metrics.get("world_pair_images", 0) if with_pairs else 0)
        values = [value(f"world_{kind}_colour"), value(f"world_{kind}_shape"), value(f"world_{kind}_background"),
                  value(f"world_{kind}_subject_background"), value("world_pair_both_colours"),
                  value("world_pair_both_apart"), value("world_pair_background"),
                  value(f"world_{kind}_clip_i", True), value(f"world_{kind}_clip_t", True)]
        return f"{images:.0f} | " + " | ".join(values)

    rows = ["| model | images | colour | shape | background | colour of the subject image's background "
            "| two subjects: both colours | two subjects: both colours, on objects apart | two subjects: background "
            "| CLIP-I | CLIP-T |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, metrics in results.items():
        rows.append(f"| {label} | {cells(metrics, 'single', True)} |")
        if label == "full":
            rows.append(f"| full, text only (`an object on a <b> background`) | {cells(metrics, 'text', False)} |")
        if "world_words_images" in metrics:  # text-to-image, as the paper's Table 2 measures stage 2
            rows.append(f"| {label}, told in words (`a red star on a <b> background`) "
                        f"| {cells(metrics, 'words', False)} |")
    if ceiling:
        rows.append(f"| mini decoder told in words (`a red star on a purple background`; ceiling) "
                    f"| {cells(ceiling[1], 'single', True)} |")
    rows.append("| chance | | 0.125 | 0.25 | 0.125 | 0.125 | | | | | |")
    return rows


def figure(results: dict[str, dict], cases: int = 6):
    """Rows of held-out cases: subject image(s) | each model's image | the text-only image."""
    from PIL import Image, ImageDraw

    from kosmos_g.pipelines.generate import image_uri
    from kosmos_g.platform.evaluation import world as world_eval
    from kosmos_g.platform.evaluation.grid import open_image

    full = results["full"]
    chosen = [c for c in world_eval.cases(full["singles"], full["pairs"], 0) if c.shows_images]
    chosen = chosen[: cases - 2] + [c for c in chosen if c.kind == "pair"][:2]
    columns = ["subject 1", "subject 2", *results, "text only"]
    cell, label_h = 96, 30
    sheet = Image.new("RGB", (cell * len(columns), label_h + len(chosen) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((c * cell + 4, 8), name, fill="black")
    for r, case in enumerate(chosen):
        top = label_h + r * (cell + label_h)
        images = [open_image(world_eval.subject_uri(full["subjects"], case, i)) if i < len(case.subjects)
                  else None for i in range(2)]
        images += [open_image(image_uri(result["out"], case.key)) for result in results.values()]
        images.append(open_image(image_uri(full["out"], case.key.replace("single", "text")))
                      if case.kind == "single" else None)
        for c, image in enumerate(images):
            if image is not None:
                sheet.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (c * cell, top))
        draw.text((4, top + cell + 4), case.prompt.replace("<image>", "<i>") + f"   ({case.text})", fill="black")
    return sheet


def pair_failures(results: dict[str, dict], ceiling: tuple[str, dict, dict] | None = None) -> list[str]:
    """One line: how often the full model (and the decoder told in words) drew two objects, and
    gave one subject's colour to both; the ways a two-subject case fails."""
    shown = [("full", results["full"])] + ([("the decoder in words", ceiling[1])] if ceiling else [])
    parts = [f"{label}: two objects drawn in {m['world_pair_two_drawn']:.2f}, one subject's colour on both in "
             f"{m['world_pair_copied_colour']:.2f}" for label, m in shown if "world_pair_copied_colour" in m]
    return ["Two subjects, how they fail: " + "; ".join(parts) + ".", ""] if parts else []


def shape_lines(full: dict, ceiling: tuple[str, dict, dict] | None) -> list[str]:
    """Where one subject's shape is lost (bench/shape_transfer.py): the full model's shapes per
    asked shape, beside its decoder's told the cases in words and its VAE's on the answers."""
    drawn = {"full": shape_transfer.model_shapes(full["out"], full["singles"]), **(ceiling[2] if ceiling else {})}
    return [*shape_transfer.report(drawn, full["singles"])[1], ""]


def target_check(metrics: dict, key: str, label: str, target: float) -> str:
    """`its shape 0.615 (95%: 0.55–0.68 over 200 cases; target ≥ 0.6: met)`: the
    interval is the evaluation's sampling alone (`rate_interval`)."""
    from kosmos_g.platform.evaluation.world import rate_interval

    rate = metrics.get(key, float("nan"))
    cases = metrics.get(f"world_{key.split('_')[1]}_images", 0)
    low, high = rate_interval(rate, cases)
    return (f"{label} {rate:.3f} (95%: {low:.2f}–{high:.2f} over {cases:.0f} cases; target ≥ {target}: "
            f"{'met' if metrics.get(key, 0) >= target else 'missed'})")


def write_report(results: dict[str, dict], jobs: dict[str, dict], memory_gb: float, wall_s: float,
                 ceiling: tuple[str, dict, dict] | None = None) -> str:
    rows = table(results, ceiling)
    full = results["full"]
    checks = [target_check(full, key, label, target) for key, (label, target) in TARGETS.items()]
    times = timing(jobs)
    wall = (f"Wall time: {wall_s / 60:.1f} min in all" + (f" ({times})" if times else "")
            + f"; peak memory above the idle machine: {memory_gb:.1f} GB.")
    if not jobs:  # --evaluate-only: the chain's own time, as the last full run wrote it, stays
        wall = (chain_time_line() + f" Evaluated again {time.strftime('%Y-%m-%d')} (`--evaluate-only`) in "
                f"{wall_s / 60:.1f} min; peak memory above the idle machine: {memory_gb:.1f} GB.").strip()
    lines = [BEGIN, "", f"Measured {time.strftime('%Y-%m-%d')} by `bench/reproduce_mini.py` "
             f"({full.get('world_single_images', 0):.0f} single-subject, {full.get('world_pair_images', 0):.0f} "
             f"two-subject held-out cases per model, and each single-subject case as a text-only twin and told in "
             f"words; models: "
             + ", ".join(f"{label} `{r['model']}`" for label, r in results.items())
             + (f", ceiling `{ceiling[0]}`" if ceiling else "") + ").", "", *rows, "",
             "Targets (full model): " + "; ".join(checks) + ".", "", *pair_failures(results, ceiling),
             *shape_lines(full, ceiling),
             wall, "",
             "![held-out cases: subject images, then each model's image](reproduce_mini.png)", "", END]
    text = "\n".join(lines)
    doc = DOC.read_text()
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + text + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n## Results of the whole chain\n\n" + text + "\n"
    DOC.write_text(doc)
    return text


def chain_time_line() -> str:
    """The wall-time line of the report in the doc (a run of the chain wrote it), or ''."""
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        return ""
    block = doc[doc.index(BEGIN): doc.index(END)]
    found = [line for line in block.splitlines() if line.startswith("Wall time:")]
    return found[0].split(" Evaluated again ")[0] if found else ""


def log_to_mlflow(text: str, results: dict[str, dict], ceiling: tuple[str, dict, dict] | None = None) -> str:
    from kosmos_g.platform import tracking

    run_id, _ = tracking.start_run("bench", f"reproduce-mini-{time.strftime('%Y%m%d-%H%M%S')}")
    for label, metrics in {**results, **({"decoder ceiling": ceiling[1]} if ceiling else {})}.items():
        prefix = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")  # MLflow's metric-name alphabet
        tracking.log_metrics(run_id, {f"{prefix}.{k}": v for k, v in metrics.items()
                                      if isinstance(v, float) and k.startswith("world_")}, 0)
    tracking.log_text(run_id, text, "reproduce_mini.md")
    tracking.client().log_artifact(run_id, str(FIGURE))
    tracking.end_run(run_id)
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluate-only", action="store_true", help="skip training; evaluate what is registered")
    parser.add_argument("--singles", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=100)
    args = parser.parse_args(argv)
    if stack_env_missing():
        return 2
    memory, started = PeakMemory(), time.monotonic()
    jobs = {} if args.evaluate_only else train_chain()
    results = evaluate(models_to_evaluate(jobs), args.singles, args.pairs)
    for label, summary in results.items():
        summary["singles"], summary["pairs"] = args.singles, args.pairs
    ceiling = decoder_ceiling(results["full"]["model"], args.singles)
    memory.stop()
    figure(results).save(FIGURE)
    text = write_report(results, jobs, memory.peak_gb, time.monotonic() - started, ceiling)
    print("\n".join(table(results, ceiling)), flush=True)
    print(f"[reproduce] MLflow run {log_to_mlflow(text, results, ceiling)}; wrote {DOC} and {FIGURE}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
