"""`dsfuse audio-emotion`: train a speech-emotion classifier (with the transcript fused in or not),
predict per file or as a streamed timeline over long audio, and generate a synthetic emotional-speech
set to train on offline. The recipes live in `dsfuse.tasks.speech_emotion`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dsfuse.choices import FeedForward, Fusion, LabelScheme, SpeakerBy, SpeechEncoder, SplitBy
from dsfuse.cli.common import (CheckpointOpt, ContrastiveOpt, DebugOpt, DeviceOpt, EngineOpt, ForceOpt, JsonOpt,
                               QuietOpt, ResumeOpt, RunOutOpt, SeedOpt, choice_metavar, command, expand_inputs,
                               given_options, report_training, stream_timelines, tabulate_each_input, trainer)
from dsfuse.report import emit_json, print_table

app = typer.Typer(help="Speech emotion: train on labelled clips, predict labels or timelines, make a synthetic set.",
                  no_args_is_help=True)


@trainer
def train(
    data: Annotated[Path, typer.Argument(help="Folder of labelled clips (see --labels).")],
    out: RunOutOpt = None,
    labels: Annotated[LabelScheme, typer.Option("--labels", help="folders: one folder per class; ravdess, crema-d: "
                                                "labels and speakers from the file names.")] = "folders",
    split_by: Annotated[SplitBy, typer.Option("--split-by", help="Hold out clips at random, or whole speakers "
                                              "(with --labels folders the speaker is the file name up to its first "
                                              "'_').")] = "random",
    heldout: Annotated[Path | None, typer.Option("--heldout", help="A separate held-out folder (same labels) "
                                                 "instead of splitting DATA.")] = None,
    heldout_fraction: Annotated[float, typer.Option("--heldout-fraction", help="Share of DATA (clips or speakers) "
                                                    "held out.")] = 0.2,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Clips per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (warmup, then cosine decay).")] = 1e-3,
    dim: Annotated[int, typer.Option("--dim", help="Model width.")] = 96,
    depth: Annotated[int, typer.Option("--depth", help="Transformer blocks.")] = 2,
    ffn: Annotated[FeedForward, typer.Option("--ffn", help="Feed-forward of each block.")] = "swiglu",
    n_mels: Annotated[int, typer.Option("--n-mels", min=64, max=80, help="Mel bands.")] = 64,
    crop_seconds: Annotated[float, typer.Option("--crop-seconds", help="Training crop length (above 0.5); "
                                                "held-out clips are classified whole.")] = 2.0,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate every N steps (0: at the end).")] = 0,
    speaker_norm: Annotated[bool, typer.Option("--speaker-norm", help="Subtract each speaker's mean log-mel "
                                               "frame from their clips (speakers as --split-by names them): "
                                               "the model hears emotion relative to the voice. predict then "
                                               "needs several clips per speaker (see its --speaker-by).")] = False,
    speaker_pattern: Annotated[str | None, typer.Option("--speaker-pattern", help="Where the speaker is in each "
                                                        "clip's path: a regular expression with a group "
                                                        "(?P<speaker>...), e.g. '_(?P<speaker>[^_/]+)_[^/]*$' or "
                                                        "'(?P<speaker>[^/]+)/[^/]+$' (a folder per speaker). "
                                                        "Default: the --labels convention.")] = None,
    fusion: Annotated[Fusion, typer.Option("--fusion", metavar=choice_metavar(Fusion),
                                           help="Fuse the audio with the transcript beside each clip (clip.wav + "
                                                "clip.txt) by this strategy; clips without one are left out.")
                      ] = "none",
    encoder: Annotated[SpeechEncoder, typer.Option("--encoder", metavar=choice_metavar(SpeechEncoder),
                                                   help="What the classifier hears: log-mels, or a pretrained "
                                                        "self-supervised speech encoder (torchaudio's bundle, "
                                                        "frozen; its weights from torch hub's cache, else "
                                                        "downloaded unless DSFUSE_OFFLINE=1).")] = "mel",
    unfreeze: Annotated[int, typer.Option("--unfreeze", min=0, help="With --encoder: fine-tune its top N "
                                          "layers too.")] = 0,
    contrastive: ContrastiveOpt = 0.0,
    resume: ResumeOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False, *, engine: EngineOpt,
) -> None:
    """Train a speech-emotion classifier (log-mel, MLA transformer) and report held-out accuracy and F1.

    Example: dsfuse audio-emotion train synthetic/train --heldout synthetic/heldout --out runs/emotion
    Example: dsfuse audio-emotion train synthetic/train --heldout synthetic/heldout --out runs/emotion --speaker-norm
    Example: dsfuse audio-emotion train synthetic/train --heldout synthetic/heldout --out runs/fused --fusion gated
    Example: dsfuse audio-emotion train synthetic/train --heldout synthetic/heldout --out runs/wavlm --encoder wavlm-base-plus
    """
    from dsfuse.device import select_device
    from dsfuse.runs import run_dir_for
    from dsfuse.tasks import speech_emotion as task

    options = task.SpeechEmotionOptions(
        data=data, labels=labels, split_by=split_by, heldout=heldout, heldout_fraction=heldout_fraction, steps=steps,
        batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed, dim=dim, depth=depth, ffn=ffn, n_mels=n_mels,
        crop_seconds=crop_seconds, speaker_norm=speaker_norm, speaker_pattern=speaker_pattern, fusion=fusion,
        encoder=encoder, unfreeze=unfreeze, contrastive=contrastive, **engine)
    result, summary = task.train(options, run_dir_for(out, task.TASK, resume), resume=resume, force=force,
                                 explicit=given_options(), device=select_device(device), quiet=quiet)
    if not json and "f1" in summary:
        transcript = f" + transcript ({summary['fusion']})" if summary["fusion"] != "none" else ""
        print_table(f"audio-emotion{transcript} held-out F1 ({summary['heldout_clips']} clips)",
                    ["class", "F1", "clips"],
                    [(c, summary["f1"][c], sum(row)) for c, row in zip(summary["classes"], summary["confusion"])])
        if "layer_weights" in summary:
            print_table(f"{encoder} layer weights (layer_weights.png in the run)", ["layer", "weight"],
                        enumerate(summary["layer_weights"], 1))
        summary = {k: v for k, v in summary.items() if k not in ("f1", "confusion", "classes", "layer_weights")}
    report_training(result, summary, json)


@command
def predict(
    files: Annotated[list[str], typer.Argument(help="Audio files, folders or globs (wav, flac, ogg, mp3, m4a, "
                                               "...); - reads paths from stdin.")],
    checkpoint: CheckpointOpt,
    segment: Annotated[float | None, typer.Option("--segment", min=0.1, max=60.0, help="Seconds per segment: a "
                                                  "timeline of labels over long audio, decoded as a stream.")] = None,
    speaker_by: Annotated[SpeakerBy | None, typer.Option("--speaker-by", help="For a checkpoint trained with "
                                                         "--speaker-norm, whose files share a speaker baseline: "
                                                         "name (the training data's file-name convention), file "
                                                         "(one long recording each) or all (one speaker).")] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Label the emotion of each file (with probabilities), or with --segment a timeline over long audio.

    A checkpoint trained with --fusion also reads each file's transcript (clip.wav + clip.txt).

    Example: dsfuse audio-emotion predict talk.mp3 --checkpoint runs/emotion --segment 2.0 --json
    Example: dsfuse audio-emotion predict synthetic/heldout --checkpoint runs/emotion --speaker-by name
    """
    from dsfuse.data.audio import AUDIO_SUFFIXES
    from dsfuse.device import seed_everything, select_device
    from dsfuse.tasks.speech_emotion import open_classifier

    torch_device = select_device(device)
    seed_everything(seed)
    paths = expand_inputs(files, AUDIO_SUFFIXES)
    classifier = open_classifier(checkpoint, paths, segment=segment, speaker_by=speaker_by, device=torch_device,
                                 quiet=quiet)
    if segment is None:
        title = "audio-emotion" + ("" if classifier.fusion == "none" else f" ({classifier.fusion} fusion + transcript)")
        return tabulate_each_input(
            paths, classifier.label_file, lambda p, r: [(p, r["label"], r["score"], r["duration"])],
            lambda rows: print_table(title, ["file", "label", "score", "seconds"], rows), as_json=json, quiet=quiet)

    def describe(record: dict[str, Any]) -> str:
        return "(silence)" if record["score"] is None else f"{record['label']} {record['score']:.2f}"

    stream_timelines(paths, lambda path: classifier.timeline(path, segment), describe, as_json=json)


@command
def synthetic(
    out: Annotated[Path, typer.Argument(help="Folder to write the synthetic set into.")],
    voices: Annotated[int, typer.Option("--voices", help="How many espeak-ng voices (1-20).")] = 20,
    sentences: Annotated[int, typer.Option("--sentences", help="How many sentences (1-20).")] = 16,
    heldout_voices: Annotated[int, typer.Option("--heldout-voices", help="Voices kept for OUT/heldout only "
                                                "(0: no split).")] = 4,
    heldout_sentences: Annotated[int, typer.Option("--heldout-sentences", help="Sentences kept for OUT/heldout "
                                                   "only (0: no split).")] = 4,
    emotions: Annotated[str, typer.Option("--emotions", help="Comma-separated classes.")] = "neutral,happy,sad,angry",
    transcripts: Annotated[bool, typer.Option("--transcripts", help="Also write each clip's sentence beside it "
                                              "(clip.txt), for train --fusion.")] = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Write a synthetic emotional-speech set (espeak-ng, one prosody per emotion) with held-out voices/sentences.

    Example: dsfuse audio-emotion synthetic synthetic --voices 20 --sentences 16
    """
    from dsfuse.device import select_device
    from dsfuse.tasks.speech_emotion import make_synthetic

    select_device(device)  # synthesis runs on the CPU; an unavailable device is still an error
    summary = make_synthetic(out, voices=voices, sentences=sentences, heldout_voices=heldout_voices,
                             heldout_sentences=heldout_sentences, transcripts=transcripts, seed=seed, force=force,
                             emotions=[e.strip() for e in emotions.split(",") if e.strip()], quiet=quiet)
    if json:
        emit_json(summary)
    else:
        print_table(f"synthetic emotional speech -> {out}", ["split", "clips", "voices", "sentences"],
                    [(n, s["clips"], " ".join(s["voices"]), len(s["sentences"])) for n, s in summary["splits"].items()])


app.command("train")(train)
app.command("predict")(predict)
app.command("synthetic")(synthetic)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="audio-emotion")


def demo_steps(samples: Path, out: Path) -> list:
    from dsfuse.cli.demo import DemoStep

    root = out / "audio-emotion"
    held_out = ["--heldout-voices", "1", "--heldout-sentences", "1"]

    def make(data: Path, voices: str, *extra: str) -> list[str]:
        return ["audio-emotion", "synthetic", str(data), "--voices", voices, "--sentences", voices, *held_out, *extra]

    def train(data: Path, run: Path, steps: str, batch: str, *extra: str) -> list[str]:
        return ["audio-emotion", "train", str(data / "train"), "--heldout", str(data / "heldout"), "--out", str(run),
                "--steps", steps, "--dim", "64", "--depth", "1", "--batch-size", batch, *extra]

    def fused(records: list[dict]) -> str:
        r = records[0]
        return (f"{r['fusion']} fusion, {r['step']} steps: held-out accuracy {r['accuracy']:.0%}, "
                f"text gate {r['gate_text']:.2f} (tiny run)")

    data, run, texts, fused_run = root / "synthetic", root / "run", root / "synthetic-text", root / "run-fused"
    return [
        DemoStep("audio-emotion synthetic", make(data, "4"), lambda r: f"{r[0]['clips']} clips", [data]),
        DemoStep("audio-emotion train", train(data, run, "40", "16"),
                 lambda r: f"held-out accuracy {r[0]['accuracy']:.0%} after {r[0]['step']} steps", [run]),
        DemoStep("audio-emotion predict", ["audio-emotion", "predict", str(samples / "speech"), "-c", str(run)],
                 lambda r: f"{sum(x['file'].split('/')[-1].startswith(x['label']) for x in r)}/{len(r)} "
                           "bundled clips labelled right", []),
        DemoStep("audio-emotion synthetic --transcripts", make(texts, "3", "--transcripts"),
                 lambda r: f"{r[0]['clips']} clips with transcripts", [texts]),
        DemoStep("audio-emotion train --fusion", train(texts, fused_run, "20", "8", "--fusion", "gated"), fused,
                 [fused_run]),
        DemoStep("audio-emotion predict (fused)", ["audio-emotion", "predict", str(texts / "heldout"), "--checkpoint",
                                                   str(fused_run)],
                 lambda r: f"{sum(Path(x['file']).parent.name == x['label'] for x in r)}/{len(r)} "
                           "held-out clips labelled right", []),
    ]
