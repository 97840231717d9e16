"""The miniature world's held-out evaluation: cases sit on held-out backgrounds, subject images
are what stage 3 trains on, and the scorer is exact on rendered answers; then
`pipelines/evaluate.py --preset world` end to end on real Ray Data, S3 and MLflow."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kosmos_g.platform import tracking
from kosmos_g.platform.data import world
from kosmos_g.platform.data.world_scorer import read_scene
from kosmos_g.platform.evaluation import world as world_eval


def _answer(case: world_eval.WorldCase, colours=None) -> Image.Image:
    """A rendered scene that fulfils `case` (optionally with other object colours)."""
    colours = colours or [s.colour for s in case.subjects]
    boxes = [(4, 14, 34, 44), (38, 18, 62, 42)]
    objects = tuple(world.WorldObject(c, s.shape, box) for c, s, box in zip(colours, case.subjects, boxes))
    return world.Scene(case.background, objects).render(32)


def test_cases_are_held_out_deterministic_and_paired_with_text_only_twins():
    cases = world_eval.cases(40, 20, seed=3)
    assert cases == world_eval.cases(40, 20, seed=3)
    assert [c.kind for c in cases].count("single") == 40 and [c.kind for c in cases].count("pair") == 20
    for case in cases:
        first = case.subjects[0]
        assert case.background == world.held_out_background(first.colour)
        for subject in case.subjects:
            assert subject.shown_on not in (subject.colour, case.background)
        assert world_eval.from_json(world_eval.to_json(case)) == case
    singles = {c.key[len("single-"):]: c for c in cases if c.kind == "single"}
    for twin in (c for c in cases if c.kind == "text"):
        single = singles[twin.key[len("text-"):]]
        assert (twin.subjects, twin.background, twin.seed) == (single.subjects, single.background, single.seed)
        assert "<image>" not in twin.prompt and not twin.shows_images
        assert world_eval.subject_uri("s3://b/subjects", twin, 0) == world_eval.subject_uri("s3://b/subjects", single, 0)
    # A key names one case whatever the counts: with other counts, the pairs differ, and so do their keys.
    other = {c.key: c for c in world_eval.cases(41, 20, seed=3)}
    assert all(other[c.key] == c for c in cases if c.key in other)
    assert not {c.key for c in cases if c.kind == "pair"} & set(other)
    pair = next(c for c in cases if c.kind == "pair")
    assert pair.prompt == f"a <image> and a <image> on a {pair.background} background"
    assert pair.subjects[0].colour != pair.subjects[1].colour
    # Told in words: the same cases, each single one with a twin that names its subject instead.
    with_words = world_eval.cases(40, 20, seed=3, words=True)
    assert [c for c in with_words if c.kind != "words"] == cases
    told = [c for c in with_words if c.kind == "words"]
    assert len(told) == 40
    for twin in told:
        single = singles[twin.key[len("words-"):]]
        assert (twin.subjects, twin.background, twin.seed) == (single.subjects, single.background, single.seed)
        subject = single.subjects[0]
        assert twin.prompt == twin.text == f"a {subject.colour} {subject.shape} on a {single.background} background"
        assert not twin.shows_images


def test_subject_images_show_the_subject_on_its_own_background():
    for case in world_eval.cases(24, 0, seed=1)[::2]:
        subject = case.subjects[0]
        reading = read_scene(world_eval.subject_image(subject, world_eval.subject_seed(case, 0)))
        assert reading.background == subject.shown_on
        assert [(o.colour, o.shape) for o in reading.objects] == [(subject.colour, subject.shape)]


def test_scorer_is_exact_on_rendered_answers_and_misses():
    for case in world_eval.cases(12, 12, seed=5, words=True):
        hits = world_eval.score(case, _answer(case))
        leak, copied, swapped = (hits.pop(name, 0.0) for name in ("subject_background", "copied_colour", "swapped"))
        assert leak == copied == swapped == 0.0 and all(value == 1.0 for value in hits.values()), (case, hits)
        wrong = [c for c in world.COLOURS if c != case.background and c not in {s.colour for s in case.subjects}]
        missed = world_eval.score(case, _answer(case, wrong[: len(case.subjects)]))
        assert missed["colour"] == 0.0 and missed["background"] == 1.0
        if case.kind in ("single", "words"):  # drawn in the colour the subject image's background has
            leaked = world_eval.score(case, _answer(case, [case.subjects[0].shown_on]))
            assert (leaked["colour"], leaked["subject_background"], leaked["swapped"]) == (0.0, 1.0, 0.0)
            subject = case.subjects[0]  # subject colour and background exchanged
            exchanged = world.Scene(subject.colour, (world.WorldObject(case.background, subject.shape, (4, 14, 34, 44)),))
            swapped = world_eval.score(case, exchanged.render(32))
            assert (swapped["colour"], swapped["background"], swapped["shape"], swapped["swapped"]) == (0.0, 0.0, 1.0, 1.0)
        if case.kind == "pair":  # the two ways a pair fails
            first, second = case.subjects
            copied = world_eval.score(case, _answer(case, [second.colour, second.colour]))
            assert (copied["both_colours"], copied["two_drawn"], copied["copied_colour"]) == (0.0, 1.0, 1.0)
            # Drawn touching (a generated image need not keep the world's gap): both colours are
            # there, though not on objects apart.
            touching = world.Scene(case.background, (world.WorldObject(first.colour, "square", (6, 16, 32, 42)),
                                                     world.WorldObject(second.colour, "square", (32, 18, 56, 42))))
            met = world_eval.score(case, touching.render(32))
            assert (met["both_colours"], met["both_apart"], met["two_drawn"]) == (1.0, 0.0, 1.0)
            alone = world.Scene(case.background, (world.WorldObject(first.colour, first.shape, (16, 16, 48, 48)),))
            one = world_eval.score(case, alone.render(32))
            assert (one["colour"], one["both_colours"], one["two_drawn"], one["copied_colour"]) == (1.0, 0.0, 0.0, 0.0)
    rows = [{"kind": "single", "colour": 1.0, "shape": 0.0, "background": 1.0},
            {"kind": "single", "colour": 0.0, "shape": 0.0, "background": 1.0},
            {"kind": "pair", "colour": 1.0, "both_colours": 0.0, "shape": float("nan"), "background": 0.0}]
    metrics = world_eval.summarise(rows)
    assert metrics == {"world_single_images": 2.0, "world_single_colour": 0.5, "world_single_shape": 0.0,
                       "world_single_background": 1.0, "world_pair_images": 1.0, "world_pair_colour": 1.0,
                       "world_pair_both_colours": 0.0, "world_pair_background": 0.0}


def test_subject_command_writes_a_prompt_image(tmp_path, capsys):
    from kosmos_g.cli.main import main

    assert main(["data", "subject", "red", "star", "--on", "blue", "-o", str(tmp_path / "red_star.png")]) == 0
    reading = read_scene(Image.open(tmp_path / "red_star.png"))
    assert reading.background == "blue" and [(o.colour, o.shape) for o in reading.objects] == [("red", "star")]
    assert main(["data", "subject", "red", "star", "--on", "red", "-o", str(tmp_path / "x.png")]) == 2
    assert "invisible" in capsys.readouterr().out and not (tmp_path / "x.png").exists()


@pytest.mark.usefixtures("ray_local")
def test_world_job_records_scores_per_model(s3_prefix, tmp_path, clip_dir, capsys, monkeypatch):
    from kosmos_g.models.checkpoint import save_servable
    from kosmos_g.models.config import model_preset
    from kosmos_g.models.kosmos_g import KosmosG
    from kosmos_g.pipelines.evaluate import main

    torch.manual_seed(0)
    bundle = save_servable(KosmosG.from_config(model_preset("tiny")), tmp_path / "bundle")
    name = f"world-{s3_prefix.rsplit('/', 1)[-1]}"
    argv = ["--preset", "world", "--model", str(bundle), "--clip", clip_dir, "--name", name,
            "--set", f"out={s3_prefix}/world-eval", "--set", "steps=2", "--set", "singles=3", "--set", "pairs=2",
            "--set", "batch_size=4", "--set", "words=true"]
    assert main(argv) == 0

    experiment = tracking.client().get_experiment_by_name(tracking.experiment_name("evaluate"))
    runs = tracking.client().search_runs([experiment.experiment_id], f"tags.benchmark = 'world'")
    run = next(r for r in runs if r.data.tags.get("model") == str(bundle))
    metrics = run.data.metrics
    assert (metrics["world_single_images"], metrics["world_text_images"], metrics["world_pair_images"],
            metrics["world_words_images"]) == (3, 3, 2, 3)
    for kind, names in {"single": ("colour", "shape", "background", "swapped"),
                        "text": ("colour", "shape", "background", "swapped"),
                        "words": ("colour", "shape", "background", "swapped", "colour_pairing_mean"),
                        "pair": ("colour", "both_colours", "two_drawn", "copied_colour", "background")}.items():
        for metric in names:
            assert 0.0 <= metrics[f"world_{kind}_{metric}"] <= 1.0
        assert -100.0 <= metrics[f"world_{kind}_clip_t"] <= 100.0
    table = tracking.client().download_artifacts(run.info.run_id, "world/scores.csv", str(tmp_path))
    with open(table) as handle:
        scored = list(csv.DictReader(handle))
    assert sorted(r["kind"] for r in scored) == ["pair"] * 2 + ["single"] * 3 + ["text"] * 3 + ["words"] * 3
    assert {r["prompt"] for r in scored if r["kind"] == "words"} == {r["text"] for r in scored if r["kind"] == "single"}
    assert 0.0 <= metrics["world_single_subject_background"] <= 1.0
    assert all(r["background"] in ("0.0", "1.0") for r in scored)
    assert all(r["two_drawn"] in ("0.0", "1.0") for r in scored if r["kind"] == "pair")
    grid = tracking.client().download_artifacts(run.info.run_id, "world/samples.png", str(tmp_path))
    assert Image.open(grid).size[1] == 11 * (128 + 34)  # every case of this small run drawn

    # bench/shape_transfer.py reads the same images back from where the job printed it wrote them:
    # its drawn shapes agree with the job's own shape hits.
    out = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])["out"]
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    import shape_transfer

    shapes = shape_transfer.model_shapes(out, 3)
    singles = {r["key"]: r for r in scored if r["kind"] == "single"}
    assert set(shapes) == set(singles) and set(shapes.values()) <= set(world_eval.DRAWN_SHAPES)
    asked_cases = {case.key: case for case in world_eval.cases(3, 2)}
    for key, row in singles.items():  # the job's table says what was drawn, and the same
        asked = asked_cases[key].subjects[0].shape
        assert shapes[key] == row["drawn_shape"] and (shapes[key] == asked) == (row["shape"] == "1.0")
    breakdown, lines = shape_transfer.report({"full": shapes}, 3)
    assert breakdown["cases"] == 3 and breakdown["full/all"] == np.mean([r["shape"] == "1.0" for r in singles.values()])
    assert lines[0].startswith("| asked shape | cases | full: shape drawn |")

    # bench/heldout_pairings.py finds the job's scores by the model it was given, and its tables
    # agree with the job's metrics, over all cases and per pairing.
    import heldout_pairings

    words = heldout_pairings.scores_of(str(bundle), "words")
    assert sorted(r["key"] for r in words) == sorted(r["key"] for r in scored if r["kind"] == "words")
    lines = heldout_pairings.table("colour", ["tiny", "tiny again"], [words, words])
    assert f"| all cases | | {metrics['world_words_colour']:.3f} | {metrics['world_words_colour']:.3f} |" in lines
    assert f"| mean over pairings | | {metrics['world_words_colour_pairing_mean']:.3f} |" in "\n".join(lines)
    with pytest.raises(LookupError, match="no finished world evaluation"):
        heldout_pairings.scores_of(str(tmp_path / "never-evaluated"), "words")


def _palette_reader(swap: bool):
    """Similarity of a reader that takes the background as the border's commonest palette colour
    (nearest) and the object as the commonest other one inside: 1 when the caption says both."""
    names, rgb = list(world.PALETTE), np.array(list(world.PALETTE.values()), dtype=np.float32)

    def similarity(images, captions):
        scores = []
        for image, caption in zip(images, captions):
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
            nearest = np.linalg.norm(pixels[..., None, :] - rgb, axis=-1).argmin(-1)
            border = np.concatenate([nearest[0], nearest[-1], nearest[:, 0], nearest[:, -1]])
            background = int(np.bincount(border, minlength=len(names)).argmax())
            inside = np.bincount(nearest.ravel(), minlength=len(names))
            inside[background] = 0
            colour, background = names[int(inside.argmax())], names[background]
            if swap:
                colour, background = background, colour
            words = caption.split()
            scores.append(float(words[1] == colour and words[-2] == background))
        return scores

    return similarity


def test_clip_binding_check_scores_a_reader_that_binds_and_one_that_swaps():
    """The zero-shot binding check against two readers of known behaviour: one that reads the
    object's and the background's colours off the pixels (always right: 1.0) and the same reader
    with the two swapped (always wrong: 0.0). A CLIP at chance scores 0.5."""
    from kosmos_g.platform.evaluation.clip_binding import SETS, binding_accuracy, binding_cases

    cases = binding_cases(count=40, seed=3)
    assert {name: len(found) for name, found in cases.items()} == {name: 40 for name in SETS}
    assert all(own != swapped for found in cases.values() for _, own, swapped in found)
    # The palette reader is blind to shapes: its four captions tie, and a tie is not a win.
    assert binding_accuracy(_palette_reader(swap=False), count=40, seed=3) == {
        **{f"binding_{n}": 1.0 for n in SETS}, **{f"shape_{n}": 0.0 for n in SETS}}
    assert binding_accuracy(_palette_reader(swap=True), count=40, seed=3) == {
        **{f"binding_{n}": 0.0 for n in SETS}, **{f"shape_{n}": 0.0 for n in SETS}}


def test_clip_shape_check_scores_a_reader_that_sees_shapes():
    """The shape half of the zero-shot check: a reader that knows only the largest object's shape
    (the world scorer's) picks the own caption over the three other shapes every time, while its
    colour binding ties (0.0)."""
    from kosmos_g.platform.data.world_scorer import read_scene
    from kosmos_g.platform.evaluation.clip_binding import SETS, binding_accuracy, shape_swaps

    assert shape_swaps("a red star on a blue background") == [
        "a red circle on a blue background", "a red square on a blue background", "a red triangle on a blue background"]

    def shape_reader(images, captions):
        return [float(read_scene(image).objects[0].shape == caption.split()[2])
                for image, caption in zip(images, captions)]

    assert binding_accuracy(shape_reader, count=40, seed=3) == {
        **{f"binding_{n}": 0.0 for n in SETS}, **{f"shape_{n}": 1.0 for n in SETS}}


def test_rate_interval_is_wilsons_and_narrows_with_cases():
    low, high = world_eval.rate_interval(0.615, 200)  # 123 of 200, worked by hand: 0.546-0.680
    assert abs(low - 0.546) < 0.001 and abs(high - 0.680) < 0.001
    assert world_eval.rate_interval(0.0, 200)[0] == 0.0 and world_eval.rate_interval(1.0, 200)[1] == 1.0
    wide, narrow = world_eval.rate_interval(0.8, 50), world_eval.rate_interval(0.8, 800)
    assert wide[0] < narrow[0] < 0.8 < narrow[1] < wide[1]
    assert world_eval.rate_interval(0.5, 0) == (0.0, 1.0)


def test_shape_breakdown_reads_drawn_shapes_and_pairs_two_sources_by_case():
    singles = [c for c in world_eval.cases(16, 2, seed=7) if c.kind != "text"]
    subject_shapes = [c.subjects[0].shape for c in singles if c.kind == "single"]

    def drawn_as(case, shape):
        if shape == "none":
            return world.Scene(case.background, ()).render(32)
        subject = case.subjects[0]
        return world.Scene(case.background, (world.WorldObject(subject.colour, shape, (4, 4, 30, 30)),)).render(32)

    # The model draws every other single case's shape; the decoder in words every case but the last
    # four, which the model draws as nothing, or wrongly.
    model, decoder = {}, {}
    for i, case in enumerate(c for c in singles if c.kind == "single"):
        wrong = next(s for s in world.SHAPES if s != case.subjects[0].shape)
        model[case.key] = world_eval.read_case(case, drawn_as(case, case.subjects[0].shape if i % 2 == 0 else
                                                              ("none" if i % 4 == 1 else wrong))).drawn_shape
        decoder[case.key] = world_eval.read_case(case, drawn_as(case, wrong if i >= 12 else
                                                                case.subjects[0].shape)).drawn_shape
    assert sum(model[c.key] == c.subjects[0].shape for c in singles if c.kind == "single") == 8
    for case in (c for c in singles if c.kind == "single"):  # a perfect generation, as the VAE check draws it
        answer = world_eval.answer_scene(case)
        assert answer == world_eval.answer_scene(case) and answer.background == case.background
        reading = world_eval.read_case(case, answer.render(32))
        assert reading.drawn_shape == case.subjects[0].shape
        assert (reading.hits["colour"], reading.hits["shape"], reading.hits["background"]) == (1.0, 1.0, 1.0)
    found = world_eval.shape_breakdown(singles, {"full": model, "decoder in words": decoder})
    assert found["cases"] == 16.0  # pairs are not shape cases
    assert found["full/all"] == 0.5 and found["decoder in words/all"] == 0.75
    for shape in world.SHAPES:
        asked = [i for i, s in enumerate(subject_shapes) if s == shape]
        if asked:
            assert found[f"full/{shape}"] == np.mean([i % 2 == 0 for i in asked])
            assert sum(found[f"confusion/{shape}/{d}"] for d in world_eval.DRAWN_SHAPES) == len(asked)
            assert found[f"confusion/{shape}/none"] == sum(i % 4 == 1 for i in asked)
    # Cases 0-11: the decoder right, the model on the even ones (6); 12-15: the decoder wrong, the model right on 12, 14.
    assert (found["paired/both"], found["paired/second_only"], found["paired/first_only"], found["paired/neither"]) \
        == (6.0, 6.0, 2.0, 2.0)
    assert found["paired/first_given_second"] == 0.5 and found["paired/first_without_second"] == 0.5
    lines = world_eval.shape_report(found, ["full", "decoder in words"])
    assert "| all | 16 | 0.50 | 0.75 |" in lines
    assert any(line.startswith("Paired by case: both draw the shape in 6,") for line in lines)
    # One source alone: no pairing.
    alone = world_eval.shape_breakdown(singles, {"full": model})
    assert "paired/both" not in alone and not any("Paired" in line for line in world_eval.shape_report(alone, ["full"]))


def test_pairings_read_from_prompts_weigh_each_held_out_pairing_once():
    cases = world_eval.cases(40, 10, seed=3, words=True)
    for case in cases:  # every kind asks for its first subject's held-out background
        assert world_eval.pairing(case.prompt) == f"{case.subjects[0].colour} on {case.background}"
    with pytest.raises(ValueError, match="no palette background"):
        world_eval.pairing("a <image> on a grey background")

    # A model that draws red and blue subjects' colours and no other: per pairing 1 or 0.
    drawn = {"red", "blue"}
    rows = [{"kind": c.kind, "prompt": c.prompt, "colour": float(c.subjects[0].colour in drawn),
             "background": 1.0, "shape": float("nan") if c.kind == "pair" else 0.0} for c in cases]
    singles = [r for r in rows if r["kind"] == "single"]
    found = world_eval.by_pairing(singles)
    assert list(found) == [name for name in map(world_eval.pairing_name, world.COLOURS) if name in found]  # palette order
    assert world_eval.pairing_name("yellow") == "yellow on white"
    assert sum(hits["cases"] for hits in found.values()) == 40
    assert {name: hits["colour"] for name, hits in found.items()} == {
        name: float(name.split()[0] in drawn) for name in found}
    metrics = world_eval.summarise(rows)
    assert metrics["world_single_colour_pairing_mean"] == sum(n.split()[0] in drawn for n in found) / len(found)
    assert metrics["world_single_colour"] == np.mean([r["colour"] for r in singles])
    assert metrics["world_single_colour"] != metrics["world_single_colour_pairing_mean"]  # the draw is uneven
    assert "world_pair_shape_pairing_mean" not in metrics and metrics["world_pair_background_pairing_mean"] == 1.0
    # Rows as `world/scores.csv` holds them: strings, "nan" where a hit is not scored.
    as_read = [{k: ("nan" if isinstance(v, float) and np.isnan(v) else str(v)) for k, v in r.items()} for r in rows]
    assert world_eval.by_pairing([r for r in as_read if r["kind"] == "single"]) == found
    assert all("shape" not in hits for hits in world_eval.by_pairing([r for r in as_read if r["kind"] == "pair"]).values())
    # Rows without prompts (the bench scripts' in-process readings) get no pairing means.
    assert not any(k.endswith("_pairing_mean") for k in world_eval.summarise([{k: v for k, v in r.items()
                                                                                 if k != "prompt"} for r in rows]))
