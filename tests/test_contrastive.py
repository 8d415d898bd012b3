"""CLIP-style contrastive alignment (nn/fusion.py) as a fusion training objective, and the retrieval metric
(recall@k) that `classify-video train` and `audio-emotion train` report with it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from dsfuse.metrics import retrieval_recall
from dsfuse.nn.fusion import ContrastiveAlignment, contrastive_loss, info_nce


def test_info_nce_is_symmetric_small_for_matched_pairs_and_log_n_for_noise():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    scale = torch.tensor(math.log(100.0))
    assert info_nce(a, a, scale) < 0.05, "each row's partner is itself"
    b = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    torch.testing.assert_close(info_nce(a, b, scale), info_nce(b, a, scale))
    assert info_nce(a, b, torch.tensor(0.0)) == pytest.approx(math.log(16), abs=0.1), "no signal: chance"


def test_recall_counts_the_partner_among_the_top_k():
    torch.manual_seed(0)
    a = torch.randn(6, 16)
    assert retrieval_recall(a, a) == {"recall@1": 1.0, "recall@5": 1.0}
    shifted = retrieval_recall(a, a[[1, 2, 3, 4, 5, 0]], ks=(1, 6))  # each partner is another row's twin
    assert shifted == {"recall@1": 0.0, "recall@6": 1.0}


def test_alignment_learns_to_retrieve_the_partner_and_its_temperature():
    torch.manual_seed(0)
    mix = torch.randn(12, 20)
    align = ContrastiveAlignment((12, 20), 16)
    optimizer = torch.optim.Adam(align.parameters(), lr=1e-2)

    def pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.randn(n, 3, 12)  # tokens of one modality; the other is a fixed mix of them, plus noise
        return first, first @ mix + 0.1 * torch.randn(n, 3, 20)

    test = pairs(64)
    before = retrieval_recall(*align(list(test), [None, None]))["recall@1"]
    start_scale = align.logit_scale.item()
    for _ in range(150):
        x, y = pairs(32)
        align([x, y], [None, torch.ones(32, 3, dtype=torch.bool)])
        loss = contrastive_loss(align)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = retrieval_recall(*align(list(test), [None, None]))["recall@1"]
    assert before < 0.3 and after > 0.9, (before, after)
    assert align.logit_scale.item() != start_scale, "the temperature is learned"


def test_contrastive_needs_a_fusion(tmp_path):
    tmp_path.joinpath("a").mkdir()
    assert_one_line_error(run_cli("audio-emotion", "train", tmp_path, "--contrastive", "0.5", "--out",
                                  tmp_path / "run"), 2, "--contrastive")
    assert_one_line_error(run_cli("classify-video", "train", tmp_path, "--contrastive", "0.5", "--out",
                                  tmp_path / "run"), 2, "--contrastive")


@pytest.mark.slow
def test_speech_and_video_report_retrieval_recall_under_contrastive(tmp_path):
    speech = tmp_path / "speech"
    assert run_cli("audio-emotion", "synthetic", speech, "--voices", "3", "--sentences", "3", "--heldout-voices",
                   "1", "--heldout-sentences", "1", "--transcripts", "-q").returncode == 0
    trained = run_cli("audio-emotion", "train", speech / "train", "--heldout", speech / "heldout", "--out",
                      tmp_path / "speech-run", "--fusion", "gated", "--contrastive", "0.5", "--steps", "4", "--dim",
                      "32", "--depth", "1", "--batch-size", "8", "--json", "-q", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    report = json.loads(trained.stdout)
    assert 0 <= report["recall@1"] <= report["recall@5"] <= 1
    metrics = [json.loads(line) for line in (tmp_path / "speech-run" / "metrics.jsonl").read_text().splitlines()]
    assert any("contrastive" in m for m in metrics), "the alignment loss is logged"

    video = tmp_path / "video"
    assert run_cli("classify-video", "make-dataset", video, "--per-class", "3", "--frames", "8", "--size", "32",
                   "--audio", "-q").returncode == 0
    trained = run_cli("classify-video", "train", video, "--out", tmp_path / "video-run", "--fusion", "early",
                      "--contrastive", "0.5", "--steps", "2", "--batch-size", "4", "--held-out", "0.34", "--json",
                      "-q", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    report = json.loads(trained.stdout)
    assert 0 <= report["recall@1"] <= report["recall@5"] <= 1
