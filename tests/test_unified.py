"""The unified-token model: the generated captioned set, the model and its sequences, train-unified,
sample --prompt, caption and moe-inspect on a real (tiny) run, and their bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, json_lines, run_cli
from dsfuse.checkpoint import CheckpointMeta, read_metadata, save_checkpoint
from dsfuse.data.captioned import (COLOURS, SHAPES, held_out, parse_caption, read_captioned, render, Scene,
                                   write_captioned_set)
from dsfuse.errors import UsageError
from dsfuse.models.unified import UnifiedConfig, UnifiedModel
from dsfuse.data.bpe import train_bpe
from dsfuse.tasks.unified import (IGNORE, UnifiedRun, caption_scores, draw_best, draw_codes, filter_logits,
                                  greedy_captions, guide, image_prefix, image_to_text, load_unified, training_batch)

TINY = ["--dim", "32", "--heads", "2", "--experts", "4", "--expert-hidden", "32", "--batch-size", "8",
        "--text-vocab", "300", "--device", "cpu"]


def tiny_vq(path: Path) -> Path:
    from dsfuse.models.vqvae import VQVAE, VQVAEConfig

    cfg = VQVAEConfig(image_size=16, downsample=4, codebook_size=16, latent_channels=4, base_channels=16,
                      channel_mult=(1, 2), attention=False)
    return save_checkpoint(path, VQVAE(cfg), CheckpointMeta.of("vqvae", cfg))


# --------------------------------------------------------------------------- the captioned set

def test_generated_set_keeps_the_held_out_pairs_out_of_training(tmp_path):
    counts = write_captioned_set(tmp_path, n_train=60, n_heldout=8, size=16, seed=0)
    assert counts == {"train": 60, "heldout": 8}
    train, heldout = read_captioned(tmp_path / "train"), read_captioned(tmp_path / "heldout")
    assert len(train.images) == 60 and len(heldout.images) == 8 and not train.uncaptioned
    for folder, wanted in ((train, False), (heldout, True)):
        for caption in folder.captions:
            attributes = parse_caption(caption)
            assert None not in attributes.values(), caption
            assert held_out(attributes["shape"], attributes["colour"]) is wanted, caption
    assert {parse_caption(c)["shape"] for c in train.captions} == set(SHAPES)
    for colour in COLOURS:  # each colour is held out with exactly one shape, and seen with the others
        assert sum(held_out(shape, colour) for shape in SHAPES) == 1, colour
    for shape in SHAPES:
        assert 0 < sum(held_out(shape, colour) for colour in COLOURS) < len(COLOURS) / 2, shape
    assert Image.open(train.images[0]).size == (16, 16)


def test_captions_name_the_shape_first_unless_asked_otherwise(tmp_path):
    scene = Scene("triangle", "blue", "large", "top left")
    assert scene.caption() == "a triangle, large and blue, at the top left"
    assert scene.caption("colour-first") == "a large blue triangle at the top left"
    for order in ("shape-first", "colour-first"):
        assert parse_caption(scene.caption(order)) == {"shape": "triangle", "colour": "blue", "size": "large",
                                                       "position": "top left"}
    proc = run_cli("make-shapes", tmp_path / "s", "--train", "3", "--heldout", "1", "--size", "16",
                   "--captions", "colour-first", "--json")
    assert proc.returncode == 0 and json_lines(proc.stdout)[-1]["captions"] == "colour-first", proc.stderr
    caption = (tmp_path / "s" / "train" / "00000.txt").read_text().split()
    assert caption[2] in COLOURS and caption[3] in SHAPES, caption


def test_rendered_scenes_show_their_colour_where_the_caption_puts_it():
    rng = __import__("numpy").random.default_rng(0)
    image = render(Scene("square", "red", "large", "top left"), 32, rng)
    top_left, bottom_right = image[4:14, 4:14].reshape(-1, 3).mean(0), image[20:30, 20:30].reshape(-1, 3).mean(0)
    assert top_left[0] > 150 and top_left[1] < 100, "a red square at the top left"
    assert bottom_right.max() < 60, "nothing at the bottom right"


def test_captions_come_from_txt_or_jsonl_and_uncaptioned_images_are_listed(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a  red\ncircle\n")
    folder = read_captioned(tmp_path)
    assert folder.captions == ["a red circle"] and [p.name for p in folder.uncaptioned] == ["b.png"]
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "b.png", "caption": "blue"}) + "\n")
    assert read_captioned(tmp_path).captions == ["blue"], "captions.jsonl wins over .txt files"
    (tmp_path / "captions.jsonl").write_text("not json\n")
    with pytest.raises(UsageError, match="line 1"):
        read_captioned(tmp_path)
    (tmp_path / "captions.jsonl").unlink()
    (tmp_path / "a.txt").unlink()
    with pytest.raises(UsageError, match="no captioned images"):
        read_captioned(tmp_path)


# --------------------------------------------------------------------------- the model and its sequences

@pytest.mark.parametrize("fusion", ["early", "parallel"])
@pytest.mark.parametrize("attention", ["mla", "differential"])
def test_cached_decoding_matches_the_full_forward(fusion, attention):
    torch.manual_seed(0)
    model = UnifiedModel(UnifiedConfig(text_vocab=40, image_vocab=16, dim=32, n_heads=2, experts=4,
                                       expert_hidden=16, fusion=fusion, attention=attention)).eval()
    cfg = model.config
    ids = torch.randint(0, cfg.image_start, (2, 14))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :3] = False  # left padding, as prompts are
    full = model(ids, mask)
    cache = model.new_cache()
    steps = [model(ids[:, :6], mask[:, :6], cache)] + [model(ids[:, t:t + 1], mask[:, t:t + 1], cache)
                                                       for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(steps, 1)[:, 3:], full[:, 3:], atol=1e-4, rtol=1e-4)


def test_an_image_code_knows_its_grid_place_whatever_the_caption_before_it():
    model = UnifiedModel(UnifiedConfig(text_vocab=40, image_vocab=16, image_tokens=4, dim=32, n_heads=2, experts=4,
                                       expert_hidden=16))
    cfg = model.config
    codes = [41, 42, 43, 44]
    short = torch.tensor([[1, cfg.image_start, *codes]])
    long = torch.tensor([[1, 2, 3, 4, cfg.image_start, *codes]])
    with torch.no_grad():
        a, b = model.grid_embedding(cfg.is_image(short), None), model.grid_embedding(cfg.is_image(long), None)
        torch.testing.assert_close(a[0, 2:], b[0, 5:])
        assert a[0, :2].abs().sum() == 0, "text and markers get no grid embedding"
        row, column = model.image_row.weight, model.image_column.weight
        torch.testing.assert_close(a[0, 2:], torch.stack([row[0] + column[0], row[0] + column[1],
                                                          row[1] + column[0], row[1] + column[1]]))


def test_parallel_fusion_keeps_the_streams_apart_until_the_gates_mix_them():
    torch.manual_seed(0)
    model = UnifiedModel(UnifiedConfig(text_vocab=40, image_vocab=16, dim=32, n_heads=2, experts=4,
                                       expert_hidden=16, fusion="parallel")).eval()
    cfg = model.config
    ids = torch.tensor([[1, 2, 3, cfg.image_start, 45, 46, 47]])
    changed = ids.clone()
    changed[0, 4] = 50  # another first image code
    attention = model.blocks[0].attn
    x = model.embed(ids)
    image = cfg.is_image(ids)
    with torch.no_grad():
        attention.text_gate.fill_(1e4)  # text only attends to text: sigmoid(gate) = 1
        before = attention(x, image, None)
        after = attention(model.embed(changed), cfg.is_image(changed), None)
        assert torch.equal(before[0, :4], after[0, :4]), "causal: earlier tokens never see a later one"
        attention.text_gate.fill_(-1e4)  # text attends to the image only
        seq = torch.tensor([[cfg.image_start, 45, 46, cfg.image_end, 1, 2]])
        seq_changed = seq.clone()
        seq_changed[0, 1] = 50
        a = attention(model.embed(seq), cfg.is_image(seq), None)
        b = attention(model.embed(seq_changed), cfg.is_image(seq_changed), None)
        assert not torch.allclose(a[0, 4:], b[0, 4:]), "the caption's cross-attention reads the image"


def test_training_sequences_put_the_answer_after_its_prompt():
    cfg = UnifiedConfig(text_vocab=40, image_vocab=16, image_tokens=4, max_text=5)
    codes = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    texts = torch.tensor([[10, 11, -1, -1, -1], [12, -1, -1, -1, -1]])
    ids, mask, targets = training_batch(cfg, codes, texts, torch.tensor([True, False]), torch.tensor([False, False]))
    assert ids[0, :3].tolist() == [10, 11, cfg.image_start]
    assert ids[0, 3:8].tolist() == [41, 42, 43, 44, cfg.image_end]
    assert targets[0].tolist()[:8] == [IGNORE] * 3 + [41, 42, 43, 44, cfg.image_end]
    assert ids[1, :6].tolist() == [cfg.image_start, 45, 46, 47, 48, cfg.image_end]
    assert targets[1, 6:8].tolist() == [12, cfg.eot] and (targets[1, :6] == IGNORE).all()
    assert not mask[0, 8:].any() and ids[0, 8:].eq(cfg.pad).all(), "padding after the shorter sequence"
    dropped, _, _ = training_batch(cfg, codes[:1], texts[:1], torch.tensor([True]), torch.tensor([True]))
    assert dropped[0, 0] == cfg.image_start, "a dropped caption leaves the image alone: the unconditional prompt"
    dropped, _, targets = training_batch(cfg, codes[1:], texts[1:], torch.tensor([False]), torch.tensor([True]))
    assert dropped[0].tolist() == [cfg.image_start, cfg.image_end, 12, cfg.eot], "a dropped image: the caption alone"
    assert targets[0].tolist() == [IGNORE, IGNORE, 12, cfg.eot]


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert (filter_logits(logits, 1.0, 2, 1.0)[0, 2:] == 0).all()
    probs = filter_logits(logits, 1.0, 0, 0.7)
    assert probs[0, 0] > 0 and probs[0, 1] > 0 and (probs[0, 2:] == 0).all()  # 0.64 + 0.24 reach 0.7
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))
    assert filter_logits(logits, 0.01, 0, 1.0)[0, 0] > 0.99, "a low temperature is nearly greedy"


def test_guidance_favours_what_the_prompt_adds_among_tokens_the_prompted_model_finds_plausible():
    cond = torch.tensor([[2.0, 1.9, -9.0, 0.0]]).log_softmax(-1)
    uncond = torch.tensor([[2.0, 0.0, -30.0, 0.0]]).log_softmax(-1)
    guided = guide(torch.cat([cond, uncond]), guidance=3.0, plausible=0.1)
    assert guided.shape == (1, 4) and guided.argmax(-1).item() == 1, "token 1 is what the prompt adds"
    assert guided[0, 2] == float("-inf"), "token 2 gains most from guidance but the prompted model finds it unlikely"
    torch.testing.assert_close(guided[0, 1], uncond[0, 1] + 3.0 * (cond[0, 1] - uncond[0, 1]))
    assert guide(torch.cat([cond, uncond]), guidance=3.0, plausible=1e-6)[0].argmax().item() == 2, \
        "without the plausibility floor, guidance alone picks the unlikely token"


def random_run(max_text: int = 6) -> UnifiedRun:
    """A randomly initialised unified model with a real BPE text tokenizer and VQ tokenizer."""
    from dsfuse.models.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    text = train_bpe([Scene("circle", "red", "large", "top left").caption(), "a square, small and blue"], 300)
    vq = VQVAE(VQVAEConfig(image_size=16, downsample=4, codebook_size=16, latent_channels=4, base_channels=16,
                           channel_mult=(1, 2), attention=False))
    cfg = UnifiedConfig(text_vocab=text.get_vocab_size(), image_vocab=16, image_tokens=16, max_text=max_text,
                        dim=32, n_heads=2, experts=4, expert_hidden=32)
    return UnifiedRun(UnifiedModel(cfg).eval(), text, vq)


@torch.no_grad()
def test_guided_captions_match_guidance_over_full_forwards_of_each_prefix():
    run = random_run()
    cfg, codes = run.config, torch.randint(0, 16, (3, 16))
    allowed = torch.tensor([*range(cfg.text_vocab), cfg.eot])
    for guidance in (1.0, 2.5):
        expected = []
        for row in codes.tolist():
            said: list[int] = []
            while len(said) <= cfg.max_text:
                rows = [[*image_prefix(cfg, row), *said], [*image_prefix(cfg, []), *said]]
                last = torch.stack([run.model(torch.tensor([r]))[0, -1, allowed] for r in rows])
                token = int(allowed[(guide(last, guidance) if guidance != 1 else last[:1]).argmax()])
                if token == cfg.eot:
                    break
                said.append(token)
            expected.append(run.decode_text(said))
        assert greedy_captions(run, codes, guidance) == expected, "cached, left-padded batch == one at a time"


@torch.no_grad()
def test_reranking_keeps_the_draw_whose_caption_the_model_finds_likeliest():
    run = random_run()
    cfg = run.config
    prompts = [run.encode_text("a circle, large and red"), run.encode_text("a square")]
    codes = torch.randint(0, 16, (2, 16))
    scores = caption_scores(run, codes, prompts)
    for i, (row, text) in enumerate(zip(codes.tolist(), prompts)):
        seq, target = image_to_text(cfg, row, text)
        logp = run.model(torch.tensor([seq]))[0, :-1].log_softmax(-1)
        wanted = [(pos, t) for pos, t in enumerate(target[1:]) if t != IGNORE]
        torch.testing.assert_close(scores[i], sum(logp[pos, t] for pos, t in wanted))
    sampling = {"guidance": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    best = draw_best(run, prompts, candidates=3, generator=torch.Generator().manual_seed(1), **sampling)
    each = [p for p in prompts for _ in range(3)]
    drawn = draw_codes(run, each, generator=torch.Generator().manual_seed(1), **sampling)
    pick = caption_scores(run, drawn, each).view(2, 3).argmax(1)
    assert torch.equal(best, drawn.view(2, 3, -1)[torch.arange(2), pick])


# --------------------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("unified")
    made = run_cli("make-shapes", root / "shapes", "--train", "48", "--heldout", "4", "--size", "16", "--json")
    assert made.returncode == 0, made.stderr
    vq = tiny_vq(root / "vq.safetensors")
    run = root / "run"
    proc = run_cli("train-unified", root / "shapes" / "train", "--tokenizer", vq, "--out", run, "--steps", "6",
                   "--sample-every", "3", "--json", "-q", *TINY)
    assert proc.returncode == 0, proc.stderr
    return root, vq, run, json_lines(proc.stdout)[-1]


def test_train_unified_writes_a_run_with_both_tokenizers_and_previews(trained):
    root, _, run, summary = trained
    assert summary["step"] == 6 and summary["images"] == 48
    meta = read_metadata(run)
    assert meta.kind == "unified" and meta.config["image_vocab"] == 16 and meta.config["image_tokens"] == 16
    assert read_metadata(run / "tokenizer.safetensors").kind == "vqvae", "the run keeps its own image tokenizer"
    assert json.loads((run / "text_tokenizer.json").read_text())["model"]["type"] == "BPE"
    for step in ("000003", "000006"):
        assert (run / f"samples_{step}.png").is_file() and (run / f"captions_{step}.jsonl").is_file()
    previews = json_lines((run / "captions.jsonl").read_text())
    assert len(previews) == 8 and all(set(p) == {"caption", "generated"} for p in previews)
    loaded = load_unified(run, torch.device("cpu"))
    vectors = loaded.vq.quantizer.decode_indices(torch.arange(16))
    torch.testing.assert_close(loaded.model.code_vectors, vectors)  # image codes embedded through the tokenizer's


def test_sample_prompt_and_caption_use_the_run(trained, tmp_path):
    root, _, run, _ = trained
    out = tmp_path / "drawn"
    proc = run_cli("sample", "-c", run, "--prompt", "a square, large and red, at the top left", "--out", out, "--n",
                   "3", "--top-k", "4", "--top-p", "0.9", "--guidance", "2", "--candidates", "2", "--json",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    drawn = json_lines(proc.stdout)[0]
    assert len(drawn["files"]) == 3 and drawn["candidates"] == 2 and Image.open(out / "000.png").size == (16, 16)
    again = run_cli("sample", "-c", run, "--prompt", "a large red square at the top left", "--out", out, "--n", "3",
                    "--top-k", "4", "--top-p", "0.9", "--guidance", "2", "--device", "cpu")
    assert_one_line_error(again, 2, "--force")

    images = root / "shapes" / "heldout"
    proc = run_cli("caption", images / "00000.png", images / "missing.png", "-c", run, "--guidance", "2", "--json",
                   "--device", "cpu")
    assert proc.returncode == 1, "a missing image fails alone"
    records = json_lines(proc.stdout)
    assert [Path(r["file"]).name for r in records] == ["00000.png"] and isinstance(records[0]["caption"], str)
    assert "missing.png" in proc.stderr and "Traceback" not in proc.stderr

    inspected = run_cli("moe-inspect", run, "--json", "--device", "cpu")  # a run as MODEL reads as -c RUN
    assert inspected.returncode == 0, inspected.stderr
    layers = json_lines(inspected.stdout)[0]["layers"]
    assert len(layers) == 2
    for layer in layers:
        modality = layer["modality"]
        assert modality["image_tokens"] == 2 * 32 * 16  # 32 probe sequences per direction, 16 codes each
        assert abs(sum(modality["text_share"]) - 1) < 1e-3 and 0 <= modality["specialisation"] <= 1


def test_bad_input_is_one_line(trained, tmp_path):
    root, vq, run, _ = trained
    data = root / "shapes" / "train"
    assert_one_line_error(run_cli("caption", data / "00000.png", "-c", vq), 2, "not a unified model")
    assert_one_line_error(run_cli("sample", "-c", run, "--prompt", "red " * 40, "--out", tmp_path / "x.png"), 2,
                          "at most 24")
    assert_one_line_error(run_cli("sample", "-c", run, "--out", tmp_path / "x.png"), 2, "--prompt")
    assert_one_line_error(run_cli("train-unified", data, "--tokenizer", vq, "--out", tmp_path / "r",
                                  "--image-dropout", "1"), 2, "--image-dropout")
    assert_one_line_error(run_cli("train-unified", data, "--tokenizer", run, "--out", tmp_path / "r", "-q"), 2,
                          "expected vqvae")
    assert not (tmp_path / "r").exists(), "nothing half-made"
    uncaptioned = tmp_path / "plain"
    uncaptioned.mkdir()
    Image.new("RGB", (16, 16)).save(uncaptioned / "a.png")
    assert_one_line_error(run_cli("train-unified", uncaptioned, "--tokenizer", vq, "--out", tmp_path / "r", "-q"),
                          2, "no captioned images")
    before = (run / "model.safetensors").read_bytes()
    other = tiny_vq(tmp_path / "other_vq.safetensors")  # fresh weights: another tokenizer's codes
    assert_one_line_error(run_cli("train-unified", data, "--tokenizer", other, "--out", run, "--resume", "-q"), 2,
                          "another tokenizer")
    assert (run / "model.safetensors").read_bytes() == before, "the run is left as it was"


@pytest.mark.slow
def test_images_without_captions_are_skipped_with_a_warning(trained, tmp_path):
    root, vq, _, _ = trained
    data = tmp_path / "data"
    data.mkdir()
    write_captioned_set(data, n_train=8, n_heldout=0, size=16, seed=1)
    Image.new("RGB", (16, 16)).save(data / "train" / "stray.png")
    proc = run_cli("train-unified", data / "train", "--tokenizer", vq, "--out", tmp_path / "r", "--steps", "1",
                   "--sample-every", "0", "--json", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 image(s) without a caption" in proc.stderr and json_lines(proc.stdout)[-1]["images"] == 8
