"""Diffusion core: schedules, objectives, samplers (against the exact denoiser of Gaussian data), the UNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsfuse.choices import Sampler, Schedule, values
from dsfuse.diffusion import NoiseSchedule, Objective, diffusion_loss, make_sampler, sample
from dsfuse.diffusion.samplers import guided_output
from dsfuse.models.unet import UNet, UNetConfig


@pytest.mark.parametrize("name", values(Schedule))
def test_schedules_go_from_signal_to_noise(name):
    abar = NoiseSchedule.make(name, 1000).alphas_cumprod
    assert abar.shape == (1000,)
    assert torch.all(abar[1:] < abar[:-1]), "signal only ever decreases"
    assert abar[0] > 0.99 and abar[-1] < 0.01


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule must be one of linear, cosine, sigmoid"):
        NoiseSchedule.make("quadratic")


@pytest.mark.parametrize("name", ["eps", "v", "x0"])
def test_objective_target_converts_back_to_x0_and_noise(name):
    schedule, objective = NoiseSchedule.make("cosine"), Objective(name)
    x0, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 10, 200, 500, 900, 998])
    alpha, sigma = schedule.coefficients(t, x0)
    x_t = alpha * x0 + sigma * noise
    x0_hat, eps_hat = objective.to_x0_eps(objective.target(x0, noise, alpha, sigma), x_t, alpha, sigma)
    assert torch.allclose(x0_hat, x0, atol=1e-3) and torch.allclose(eps_hat, noise, atol=1e-3)


class GaussianDenoiser(nn.Module):
    """The exact denoiser of data ~ N(mean, std^2): E[x0 | x_t] is linear in x_t; outputs `objective`."""

    null_class = 0

    def __init__(self, schedule: NoiseSchedule, objective: Objective, mean: float, std: float):
        super().__init__()
        self.schedule, self.objective, self.mean, self.std = schedule, objective, mean, std

    def forward(self, x, t, y=None):
        alpha, sigma = self.schedule.coefficients(t, x)
        x0 = self.mean + alpha * self.std**2 / (alpha**2 * self.std**2 + sigma**2) * (x - alpha * self.mean)
        eps = (x - alpha * x0) / sigma
        return self.objective.target(x0, eps, alpha, sigma)


def gaussian_samples(sampler_name: str, steps: int, objective_name: str = "eps", n: int = 4000) -> torch.Tensor:
    schedule, objective = NoiseSchedule.make("cosine"), Objective(objective_name)
    model = GaussianDenoiser(schedule, objective, mean=0.5, std=0.3)
    sampler = make_sampler(sampler_name, schedule, objective, steps, clip_x0=None)
    return sample(model, sampler, (n, 2), generator=torch.Generator().manual_seed(0))


# Few, large steps under-disperse (DDPM's posterior variance leaves out the uncertainty about x0; the ODE
# solvers' discretisation error): known properties, hence the wider tolerances there. diffusers'
# DDIMScheduler (trailing) and DPMSolverMultistepScheduler give the same numbers on this oracle.
@pytest.mark.parametrize("sampler_name, steps, std_tol", [("ddpm", 1000, 0.015), ("ddpm", 50, 0.04),
                                                          ("ddim", 50, 0.02), ("ddim", 10, 0.07),
                                                          ("dpm++", 20, 0.015), ("dpm++", 8, 0.07)])
@pytest.mark.parametrize("objective_name", ["eps", "v", "x0"])
def test_samplers_reproduce_the_data_distribution(sampler_name, steps, std_tol, objective_name):
    x = gaussian_samples(sampler_name, steps, objective_name)
    assert abs(x.mean().item() - 0.5) < 0.02
    assert abs(x.std().item() - 0.3) < std_tol, x.std()


def test_second_order_solver_beats_ddim_at_the_same_step_count():
    for steps in (8, 20):
        ddim_error = abs(gaussian_samples("ddim", steps).std().item() - 0.3)
        dpm_error = abs(gaussian_samples("dpm++", steps).std().item() - 0.3)
        assert dpm_error < ddim_error, (steps, dpm_error, ddim_error)


def test_ddim_with_eta_one_adds_noise_and_eta_zero_does_not():
    schedule, objective = NoiseSchedule.make("linear"), Objective("eps")
    model = GaussianDenoiser(schedule, objective, mean=0.0, std=1.0)
    start = torch.Generator().manual_seed(1)
    a = sample(model, make_sampler("ddim", schedule, objective, 20, clip_x0=None), (8, 3),
               generator=torch.Generator().manual_seed(1))
    # eta = 0: only the starting noise matters, so a generator re-seeded the same way gives the same images
    b = sample(model, make_sampler("ddim", schedule, objective, 20, clip_x0=None), (8, 3), generator=start)
    assert torch.equal(a, b)
    c = sample(model, make_sampler("ddim", schedule, objective, 20, eta=1.0, clip_x0=None), (8, 3),
               generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)


def test_clipping_keeps_pixel_samples_in_range():
    schedule, objective = NoiseSchedule.make("cosine"), Objective("eps")
    model = GaussianDenoiser(schedule, objective, mean=0.0, std=3.0)  # data far outside [-1, 1]
    x = sample(model, make_sampler("ddim", schedule, objective, 10, clip_x0=1.0), (500, 2),
               generator=torch.Generator().manual_seed(0))
    assert x.abs().max() <= 1.0 + 1e-5


@pytest.mark.parametrize("steps", [0, 1001])
def test_step_count_out_of_range_is_refused(steps):
    schedule = NoiseSchedule.make("cosine")
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        make_sampler("ddim", schedule, Objective("eps"), steps)


def test_timesteps_are_evenly_spaced_and_trailing():
    sampler = make_sampler("dpm++", NoiseSchedule.make("cosine"), Objective("eps"), 4)
    assert sampler.timesteps.tolist() == [999, 749, 499, 249]
    assert make_sampler("ddpm", NoiseSchedule.make("cosine"), Objective("eps"), 1000).timesteps.tolist() == \
        list(range(999, -1, -1))


def tiny_unet(**overrides) -> UNet:
    cfg = UNetConfig(**{"image_size": 16, "base_channels": 16, "channel_mults": (1, 2), "num_res_blocks": 1,
                        "attention_resolutions": (8,), "head_channels": 8, **overrides})
    return UNet(cfg)


def test_unet_maps_images_to_images_and_uses_time_and_class():
    torch.manual_seed(0)
    net = tiny_unet(num_classes=3)
    for p in net.parameters():  # the zero-initialised output would hide every dependency
        nn.init.normal_(p, std=0.05)
    net.eval()  # no dropout
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    out = net(x, t, torch.tensor([0, 1]))
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, t + 100, torch.tensor([0, 1])))
    assert not torch.allclose(out, net(x, t, torch.tensor([2, 2])))
    assert torch.allclose(net(x, t), net(x, t, torch.tensor([3, 3])), atol=1e-6), "no label means the null class"


def test_unet_refuses_a_size_its_levels_cannot_halve():
    with pytest.raises(ValueError, match="divisible"):
        tiny_unet(image_size=18, channel_mults=(1, 2, 2))


def test_guidance_one_is_the_conditional_output_and_zero_the_unconditional():
    torch.manual_seed(0)
    net = tiny_unet(num_classes=2)
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    net.eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 5]), torch.tensor([0, 1])
    assert torch.allclose(guided_output(net, x, t, y, 1.0), net(x, t, y), atol=1e-5)
    assert torch.allclose(guided_output(net, x, t, y, 0.0), net(x, t), atol=1e-5)


@pytest.mark.parametrize("objective_name", ["eps", "v", "x0"])
def test_a_few_steps_of_training_reduce_the_loss(objective_name):
    torch.manual_seed(0)
    net, schedule, objective = tiny_unet(), NoiseSchedule.make("cosine"), Objective(objective_name)
    data = torch.zeros(16, 3, 16, 16)
    data[:, :, 4:12, 4:12] = 1.0  # one white square: easy to learn
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def loss() -> torch.Tensor:
        return diffusion_loss(net, data, schedule, objective, min_snr_gamma=5.0)

    torch.manual_seed(1)
    before = torch.stack([loss().detach() for _ in range(4)]).mean()
    for _ in range(25):
        opt.zero_grad()
        loss().backward()
        opt.step()
    torch.manual_seed(1)
    after = torch.stack([loss().detach() for _ in range(4)]).mean()
    assert after < 0.7 * before, (before, after)


def test_every_sampler_is_known_by_name():
    schedule = NoiseSchedule.make("cosine")
    for name in values(Sampler):
        assert make_sampler(name, schedule, Objective("eps"), 5).timesteps.numel() == 5
    with pytest.raises(ValueError, match=r"sampler must be one of ddpm, ddim, dpm\+\+"):
        make_sampler("euler", schedule, Objective("eps"), 5)


def test_unet_config_refuses_a_side_the_levels_cannot_halve():
    from dsfuse.errors import ConfigError

    with pytest.raises(ConfigError, match="divisible by 2\\^2") as refused:
        UNetConfig(image_size=18, channel_mults=(1, 2, 2))
    assert refused.value.field == "channel_mults"


def test_a_pipeline_reads_its_setup_and_class_names_from_the_checkpoint_record(tmp_path):
    from dsfuse.checkpoint import CheckpointMeta, save_checkpoint
    from dsfuse.diffusion.pipeline import load_diffusion
    from dsfuse.errors import UsageError

    cfg = UNetConfig(image_size=8, base_channels=16, channel_mults=(1,), num_res_blocks=1, attention_resolutions=(),
                     num_classes=2)
    net = UNet(cfg)
    for name, fields, refusal in (("bare", {}, "no diffusion setup"),
                                  ("nameless", {"setup": {"schedule": "linear"}}, "no class names")):
        save_checkpoint(tmp_path / f"{name}.safetensors", net, CheckpointMeta.of("unet", cfg, **fields))
        with pytest.raises(UsageError, match=refusal):
            load_diffusion(tmp_path / f"{name}.safetensors")
    save_checkpoint(tmp_path / "named.safetensors", net,
                    CheckpointMeta.of("unet", cfg, classes=("a", "b"), setup={"schedule": "linear"}))
    model = load_diffusion(tmp_path / "named.safetensors")
    assert model.classes == ["a", "b"] and model.setup.schedule == "linear" and model.conditional
