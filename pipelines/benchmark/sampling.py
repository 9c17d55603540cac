"""The ``sampling`` section: one guided forward batched against two forwards and unguided, full DDIM runs and
DDPM steps extrapolated to T = 1000, on the small network with PD-CBDM's components."""

from __future__ import annotations

from typing import Any

from pdcbdm.config import DiffusionConfig
from pipelines.benchmark.runner import JobRunner, PeakMemory, _base_spec, _log, timed_median
from pipelines.benchmark.settings import NETWORK_SHAPES, NETWORK_TSA, NUM_CLASSES, BenchSettings


# ---------------------------------------------------------------------------------------------------------------
# sampling job
# ---------------------------------------------------------------------------------------------------------------
def _two_forwards(net: Any) -> Any:
    """Wrap ``net`` so a guidance batch [cond; uncond] goes through as two forwards of half size (the unbatched
    classifier-free guidance baseline), with the same result as one batched forward."""
    # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
    import torch
    from torch import nn

    class TwoForwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if x.shape[0] % 2:
                return self.net(x, t, y)
            h = x.shape[0] // 2
            return torch.cat([self.net(x[:h], t[:h], y[:h]), self.net(x[h:], t[h:], y[h:])])

    return TwoForwards().eval()


def _forward_rows(net: Any, labels: Any, shape: tuple[int, ...], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One eps evaluation three ways: unguided (one pass), guided batched (``guided_eps``), guided in two passes."""
    # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
    import torch
    from pdcbdm.sampling import guided_eps

    device, w, null = spec["device"], spec["guidance"], net.null_label
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((labels.shape[0], *shape), generator=gen).to(device)
    t = torch.randint(0, 1000, (labels.shape[0],), generator=gen).to(device)
    two = _two_forwards(net)
    modes = {"unguided (w=0)": (net, 0.0), "guided, batched": (net, w), "guided, two forwards": (two, w)}
    rows = []
    for mode, (model, weight) in modes.items():
        with torch.no_grad():
            timing = timed_median(lambda: guided_eps(model, x, t, labels, weight, null), device, warmup=1,
                                  repeats=max(3, spec["repeats"]))
        rows.append({"what": f"eps forward, {mode}", "seconds": timing.median_s, "cpu_s": timing.cpu_median_s,
                     "images_per_s": labels.shape[0] / timing.median_s})
    return rows


def _sampler_rows(net: Any, labels: Any, shape: tuple[int, ...], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Full DDIM runs (guidance batched and in two forwards) and DDPM steps extrapolated to T = 1000."""
    # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
    import torch
    from pdcbdm.diffusion import GaussianDiffusion
    from pdcbdm.sampling import ddim_sample, ddpm_sample

    device, w, n = spec["device"], spec["guidance"], labels.shape[0]
    diffusion = GaussianDiffusion(DiffusionConfig())
    rows = []
    for steps in spec["ddim_steps"]:
        for mode, model in (("batched", net), ("two forwards", _two_forwards(net))):
            run = lambda: ddim_sample(model, diffusion, labels, shape, steps=steps, guidance=w,  # noqa: E731
                                      null_label=net.null_label, generator=torch.Generator().manual_seed(0))
            timing = timed_median(run, device, warmup=0, repeats=spec["repeats"])
            sec = timing.median_s
            rows.append({"what": f"DDIM {steps} steps, guidance {mode}", "seconds": sec, "images_per_s": n / sec,
                         "seconds_per_step": sec / steps, "cpu_s": timing.cpu_median_s})
    probe = GaussianDiffusion(DiffusionConfig(timesteps=spec["ddpm_probe_steps"]))
    run = lambda: ddpm_sample(net, probe, labels, shape, guidance=w, null_label=net.null_label,  # noqa: E731
                              generator=torch.Generator().manual_seed(0))
    timing = timed_median(run, device, warmup=0, repeats=spec["repeats"])
    per_step, scale = timing.median_s / spec["ddpm_probe_steps"], 1000 / spec["ddpm_probe_steps"]
    rows.append({"what": "DDPM 1000 steps, guidance batched (extrapolated)", "seconds": per_step * 1000,
                 "images_per_s": n / (per_step * 1000), "seconds_per_step": per_step, "extrapolated": True,
                 "measured_steps": spec["ddpm_probe_steps"], "cpu_s": timing.cpu_median_s * scale})
    return rows


def sampling_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Sampler throughput of the network ``spec["preset"]`` with TSA on at ``spec["batch"]`` images (fp32)."""
    # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
    import torch
    from pdcbdm.models import build_unet
    from pdcbdm.sampling import uniform_labels

    network = spec["preset"]
    torch.manual_seed(0)
    net = build_unet(network, NUM_CLASSES, tsa_resolutions=NETWORK_TSA[network]).to(spec["device"]).eval()
    labels = uniform_labels(spec["batch"], NUM_CLASSES).to(spec["device"])
    shape = NETWORK_SHAPES[network]
    memory = PeakMemory(spec["device"])
    memory.start()
    rows = _forward_rows(net, labels, shape, spec) + _sampler_rows(net, labels, shape, spec)
    return {"preset": network, "batch": spec["batch"], "guidance": spec["guidance"], "tsa_resolutions":
            NETWORK_TSA[network], "params": net.count_parameters(), "rows": rows, **memory.stop()}


def run_sampling_section(runner: JobRunner, s: BenchSettings) -> dict[str, Any]:
    """The sampling job on the small network."""
    _log(f"[sampling] small batch {s.sample_batch}, DDIM {list(s.ddim_steps)}, DDPM probe {s.ddpm_probe_steps}")
    spec = {**_base_spec(s), "preset": "small", "batch": s.sample_batch, "guidance": s.guidance,
            "ddim_steps": list(s.ddim_steps), "ddpm_probe_steps": s.ddpm_probe_steps, "repeats": s.sample_repeats}
    return runner.run("sampling", spec)
