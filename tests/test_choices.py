"""Choices are declared once (dsfuse/choices.py) and reach --help, validation and the agent's schemas."""

from __future__ import annotations

import pytest

from conftest import assert_one_line_error, run_cli
from dsfuse import choices
from dsfuse.agent.tools import build_tools

# (tool, argument, the choice it takes)
CHOICE_OPTIONS = [
    ("classify-video-train", "fusion", choices.Fusion),
    ("classify-video-train", "backbone", choices.Backbone),
    ("audio-emotion-train", "fusion", choices.Fusion),
    ("moe-inspect", "router", choices.Router),
    ("sample", "sampler", choices.Sampler),
    ("train-ddpm", "schedule", choices.Schedule),
    ("train-ddpm", "objective", choices.Objective),
    ("compress-tokens", "method", choices.CompressMethod),
    ("train-vqvae", "quantizer", choices.Quantizer),
    ("train-unified", "fusion", choices.UnifiedFusion),
    ("train-unified", "attention", choices.AttentionVariant),
]


@pytest.mark.parametrize("tool, argument, choice", CHOICE_OPTIONS)
def test_the_enum_reaches_the_agent_schema(tool, argument, choice):
    schema = build_tools()[tool].schema["properties"][argument]
    assert schema.get("enum", schema.get("items", {}).get("enum")) == list(choices.values(choice))


def test_help_lists_the_choices_and_typer_refuses_others():
    help_text = run_cli("classify-video", "train", "--help").stdout
    assert all(value in help_text for value in choices.values(choices.Fusion))
    assert_one_line_error(run_cli("sample", "--checkpoint", "x", "--out", "y", "--sampler", "euler"), 2, "euler")


def test_the_lower_floors_accept_exactly_the_declared_choices():
    from dsfuse.diffusion.objectives import Objective
    from dsfuse.diffusion.schedules import NoiseSchedule
    from dsfuse.nn.fusion import STRATEGIES
    from dsfuse.nn.moe import MoEConfig

    assert tuple(STRATEGIES) == choices.values(choices.Fusion)  # "none" included: fusion is optional
    for router in choices.values(choices.MoERouter):
        MoEConfig(dim=8, n_experts=4, top_k=2, router=router, vocab_size=16)
    with pytest.raises(ValueError, match="router must be one of topk, noisy, aux-free, hash"):
        MoEConfig(dim=8, n_experts=4, top_k=2, router="sinkhorn")
    for name in choices.values(choices.Schedule):
        NoiseSchedule.make(name, 10)
    for name in choices.values(choices.Objective):
        Objective(name)
