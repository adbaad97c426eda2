"""Front ends and repeated passes: the batched Kaldi fbank, one shared log-mel per batch, and b1-b3
scored from the pass the flow's input already made; each against what it replaced, in one run.

    python benchmarks/bench_frontend.py                 # CPU, ~2 min on 2 cores
    python benchmarks/bench_frontend.py --clips 32 --repeats 5

On `--clips` clips of 10 s (the first-shot synthetic valve, the default members and references):

  fbank     `AstFbank` (b1's input) batched in torch against `transformers.ASTFeatureExtractor`'s
            numpy loop (`backend="extractor"`): clips/s and the largest difference; and against
            the framing it had until 2026-12-05 (`framed_first`: each frame's mean removed,
            pre-emphasised and windowed in four passes over the framed array); and its float64
            FFT through scipy (`asd.features.rfft64`) against torch's, which it replaced (`fft`:
            milliseconds, the largest difference of the spectra and of the whole fbank)
  scoring   `asd.run.predict.member_scores` of the whole default ensemble against the same with the
            three replaced: b1 on the extractor, every member its own log-mel module, b1 and b3
            embedding a second time and b2 encoding a second time: clips/s and the largest
            difference of every score column
  training  one training forward + backward of every member (`Ensemble.losses`), the same two ways
  per part  the milliseconds of scoring the clips spent in the flow's input and in each member
  memory format  b7's scoring, b6's predicted masks (`mask_probabilities`) and one training pass
            of the whole ensemble with the convolutions `asd.branches.base.conv_input` feeds in
            channels-last memory (`CONV_MEMORY_FORMAT`, the default) against NCHW, the same weights:
            milliseconds and the largest difference of the outputs
  b6 error pass  b6's pass for its error scores (`reproject(predict=False)`: x_s alone) against
            the full stage-2 pass it ran until 2026-12-05 (x_g and the mask predictor as well)
  b2 latent  b2's scoring decoding the encoder latent the flow's input kept (`flow_outputs`)
            against its own second encoder pass, which it ran until 2026-12-05
  b4 calls  b4's scoring with the configured DDIM steps x noise draws against `--b4-before` (the
            4 x 2 it had until 2026-12-05), the same weights: milliseconds for the clips, and the
            steps and draws each side was built with

Best of `--repeats`, the two sides taking turns (`benchmarks/timing.py`), so load from other
processes falls on both. Runs under the entry points' malloc setting (`asd.allocator`: freed
memory reused, since 2026-12-05; `ASD_MALLOC=system` for glibc's own, as the files before that
date were measured), recorded as `allocator`. Writes benchmarks/results/bench_frontend.json.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from timing import best_times, environment, write_result

import asd.branches.base as branch_base
import asd.features as features
from asd.allocator import allocator_choice, reuse_freed_memory
from asd.features import AstFbank, LogMel, rfft64
from asd.run.build import build_datamodule, build_ensemble, data_facts
from asd.run.calibrate import fit_backends
from asd.run.predict import member_scores

REPO = Path(__file__).resolve().parents[1]
FIRST_SHOT = [
    "data.synthetic.machines=[valve]",
    "data.synthetic.sections=1",
    "data.synthetic.source_train=8",
    "data.synthetic.target_train=2",
    "data.synthetic.test_per_class=16",
    "data.synthetic.duration=10.0",
    "data.audio.duration=10.0",
]


def first_shot(clips: int) -> tuple:
    """The first-shot valve's datamodule, the default ensemble built from seed 0 with its backends
    fitted, and a batch of its first `clips` test clips (all of them when there are fewer)."""
    torch.manual_seed(0)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*FIRST_SHOT, "run_dir=/tmp/bench_frontend"])
    dm = build_datamodule(cfg)
    dm.setup()
    ensemble = build_ensemble(cfg, data_facts(dm))
    fit_backends(ensemble, dm, torch.device("cpu"))
    test = dm.datasets["test"]
    rows = range(min(clips, len(test)))
    return dm, ensemble, {k: torch.stack([test[i][k] for i in rows]) for k in test[0]}


def before(ensemble) -> None:
    """Undo the three changes on a copy: b1 on the extractor, own log-mel modules, no reused embeddings."""
    for member in ensemble.members.values():
        frontend = getattr(member, "frontend", None)
        if isinstance(frontend, AstFbank):
            frontend.backend = "extractor"
        elif type(frontend) is LogMel:
            member.frontend = copy.deepcopy(frontend)  # its own module: no shared memo


def scores_without_reuse(ensemble, batch: dict) -> dict:
    """`member_scores` as it was: the flow's input without the per-member embeddings kept."""
    batch = {k: v for k, v in ensemble.with_flow_input(batch).items() if not k.startswith("z_")}
    out = {}
    for name, member in ensemble.members.items():
        for kind, s in member.scores(batch).items():
            out[f"{name}_{kind}" if kind else name] = s
    return out


def training_pass(ensemble, batch: dict) -> float:
    ensemble.zero_grad(set_to_none=True)
    losses = ensemble.losses(batch)
    total = sum(losses.values())
    total.backward()
    return float(total.detach())


def framed_first(fbank: AstFbank, wave: torch.Tensor) -> torch.Tensor:
    """`AstFbank`'s torch recipe with the framing it had until 2026-12-05 (`fbank_frames`: each
    frame's mean removed, pre-emphasised and windowed in four passes over the framed array); then
    today's FFT, mel filters, log, padding and normalisation: (B, max_length, num_mel_bins)."""
    spec = rfft64(fbank_frames(fbank, wave), fbank.fft_length)
    mel = torch.clamp((spec.real.square() + spec.imag.square()) @ fbank.kaldi_fb, min=fbank.mel_floor)
    fb = torch.log(mel)[:, : fbank.max_length]
    fb = torch.nn.functional.pad(fb, (0, 0, 0, fbank.max_length - fb.shape[1]))  # zero rows after the clip
    return (fb - fbank.mean) / (fbank.std * 2)


def torch_rfft64(frames: torch.Tensor, n: int) -> torch.Tensor:
    """`asd.features.rfft64` as it was until 2026-12-05: torch's float64 FFT, rounded to complex64."""
    return torch.fft.rfft(frames, n=n).to(torch.complex64)


def with_torch_fft(fbank: AstFbank, wave: torch.Tensor) -> torch.Tensor:
    """`fbank(wave)` with `torch_rfft64` in place of `asd.features.rfft64`'s scipy path."""
    scipy_path = features.rfft64
    features.rfft64 = torch_rfft64
    try:
        return fbank(wave)
    finally:
        features.rfft64 = scipy_path


def fbank_frames(fbank: AstFbank, wave: torch.Tensor) -> torch.Tensor:
    """The windowed float64 frames of `AstFbank`'s recipe, each frame's mean removed, pre-emphasised
    and windowed in turn as until 2026-12-05 (today's order differs by rounding): (B, frames, 400)."""
    x = wave.to(torch.float64)
    frames = x.unfold(-1, fbank.frame_length, fbank.frame_shift)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    k = fbank.preemphasis
    frames = torch.cat([frames[..., :1] * (1 - k), frames[..., 1:] - k * frames[..., :-1]], dim=-1)
    return frames * fbank.kaldi_window


def in_format(memory_format: torch.memory_format, fn):
    """`fn` run with the convolution stacks' inputs in `memory_format`, the format before restored after."""

    def run():
        before = branch_base.CONV_MEMORY_FORMAT
        branch_base.CONV_MEMORY_FORMAT = memory_format
        try:
            return fn()
        finally:
            branch_base.CONV_MEMORY_FORMAT = before

    return run


def largest_difference(a, b) -> float:
    """Largest |a - b| over a pair of tensors, or of dicts of them (the keys both have)."""
    if isinstance(a, dict):
        return max((largest_difference(a[k], b[k]) for k in a if k in b), default=0.0)
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_frontend.json")
    parser.add_argument(
        "--b4-before",
        type=int,
        nargs=2,
        default=(4, 2),
        metavar=("STEPS", "DRAWS"),
        help="b4's DDIM steps and noise draws to time the configured ones against",
    )
    args = parser.parse_args()
    allocator = {"ASD_MALLOC": allocator_choice(), "reuses_freed_memory": reuse_freed_memory()}
    steps, draws = args.b4_before
    dm, ours, batch = first_shot(args.clips)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg_b4 = compose(
            "train",
            overrides=[
                *FIRST_SHOT,
                "run_dir=/tmp/bench_frontend",
                f"branches.b4.ddim_steps={steps}",
                f"branches.b4.noise_draws={draws}",
            ],
        )
    theirs = copy.deepcopy(ours)
    before(theirs)
    n = len(batch["wave"])
    result = {
        "what": __doc__.splitlines()[0],
        "clips": n,
        "seconds_per_clip": 10.0,
        **environment(torch.device("cpu")),
        "allocator": allocator,
    }

    fbank = AstFbank()
    extractor = AstFbank(backend="extractor")
    (t_ours, t_theirs), (a, b) = best_times(
        [lambda: fbank(batch["wave"]), lambda: extractor(batch["wave"])], args.repeats
    )
    with torch.no_grad():
        (t_now, t_framed), (c, d) = best_times(
            [lambda: fbank(batch["wave"]), lambda: framed_first(fbank, batch["wave"])], args.repeats
        )
    # the float64 FFT of the windowed frames: scipy's (rfft64 on the CPU) against torch's, which it replaced
    frames = fbank_frames(fbank, batch["wave"])
    with torch.no_grad():
        (t_scipy, t_torch), (c64, c64_torch) = best_times(
            [
                lambda: rfft64(frames, fbank.fft_length),
                lambda: torch_rfft64(frames, fbank.fft_length),
            ],
            args.repeats,
        )
    fft = {
        "scipy_ms": 1000 * t_scipy,
        "torch_ms": 1000 * t_torch,
        "speedup": t_torch / t_scipy,
        "max_abs_diff": float((c64 - c64_torch).abs().max()),
        "fbank_max_abs_diff": largest_difference(fbank(batch["wave"]), with_torch_fft(fbank, batch["wave"])),
    }
    result["fbank"] = {
        "torch_clips_per_s": n / t_ours,
        "extractor_clips_per_s": n / t_theirs,
        "speedup": t_theirs / t_ours,
        "max_abs_diff": float((a - b).abs().max()),
        "framed_first": {
            "torch_clips_per_s": n / t_now,
            "framed_first_clips_per_s": n / t_framed,
            "speedup": t_framed / t_now,
            "max_abs_diff": float((c - d).abs().max()),
        },
        "fft": fft,
    }

    ours.eval()
    theirs.eval()
    with torch.inference_mode():
        (t_ours, t_theirs), (a, b) = best_times(
            [lambda: member_scores(ours, batch), lambda: scores_without_reuse(theirs, batch)], args.repeats
        )
    result["scoring"] = {
        "ours_clips_per_s": n / t_ours,
        "before_clips_per_s": n / t_theirs,
        "speedup": t_theirs / t_ours,
        "max_abs_diff": {k: float((a[k] - b[k]).abs().max()) for k in a},
    }
    # where the scoring time goes now: the flow's input (b1-b3's embeddings, which b1 and b3 then
    # score from, and b2's latent, which b2 decodes) and each member's `scores` on it; the shared
    # log-mel is computed by the first member that asks for it and read from the module's memo by
    # the others
    with torch.inference_mode():
        flow_batch = ours.with_flow_input(batch)
        parts = {"flow input": lambda: ours.with_flow_input(batch)}
        parts |= {name: (lambda m=member: m.scores(flow_batch)) for name, member in ours.members.items()}
        times, _ = best_times(list(parts.values()), args.repeats)
    result["scoring_ms_per_part"] = {k: 1000 * t for k, t in zip(parts, times, strict=True)}

    # the 2-D convolution stacks in channels-last memory (the default) against NCHW
    formats = (torch.channels_last, torch.contiguous_format)
    with torch.inference_mode():
        b6 = ours.members["b6"]
        calls = {
            "b7": lambda: ours.members["b7"].scores(flow_batch),
            "b6 masks": lambda: b6.mask_probabilities(batch),
        }
        result["memory_format"] = {}
        for name, fn in calls.items():
            (t_last, t_nchw), (a, b) = best_times([in_format(f, fn) for f in formats], args.repeats)
            result["memory_format"][name] = {
                "channels_last_ms": 1000 * t_last,
                "nchw_ms": 1000 * t_nchw,
                "speedup": t_nchw / t_last,
                "max_abs_diff": largest_difference(a, b),
            }
    ours.train()
    (t_last, t_nchw), _ = best_times(
        [in_format(f, lambda: training_pass(ours, batch)) for f in formats], args.repeats
    )
    ours.eval()
    result["memory_format"]["training pass"] = {
        "channels_last_ms": 1000 * t_last,
        "nchw_ms": 1000 * t_nchw,
        "speedup": t_nchw / t_last,
    }

    # b6's error pass: x_s alone against the full pass with x_g and the mask predictor
    with torch.inference_mode():
        x = b6.stats.normalise(b6.spectrogram(batch))
        (t_alone, t_full), (a, b) = best_times(
            [lambda: b6.reproject(x, predict=False), lambda: b6.reproject(x)], args.repeats
        )
    result["b6_error_pass"] = {
        "x_s_alone_ms": 1000 * t_alone,
        "full_pass_ms": 1000 * t_full,
        "speedup": t_full / t_alone,
        "max_abs_diff_x_s": float((a.x_s - b.x_s).abs().max()),
    }

    # b2 decoding the latent the flow's input kept against encoding the clips again (a fresh flow
    # input: the training passes above moved b2's running bin statistics, which the latent depends on)
    with torch.inference_mode():
        b2 = ours.members["b2"]
        flow_batch = ours.with_flow_input(batch)
        plain = {k: v for k, v in flow_batch.items() if not k.startswith("z_")}
        calls = [lambda: b2.scores(flow_batch), lambda: b2.scores(plain)]
        (t_kept, t_own), (a, b) = best_times(calls, args.repeats)
    result["b2_latent"] = {
        "kept_latent_ms": 1000 * t_kept,
        "own_pass_ms": 1000 * t_own,
        "speedup": t_own / t_kept,
        "max_abs_diff": largest_difference(a, b),
    }

    # b4 with the configured denoiser calls against the earlier ones, the same weights and banks' data
    b4_before = build_ensemble(cfg_b4, data_facts(dm))
    b4_before.load_state_dict(ours.state_dict())
    fit_backends(b4_before, dm, torch.device("cpu"))
    b4_before.eval()
    with torch.inference_mode():
        members = [ours.members["b4"], b4_before.members["b4"]]
        for member in members:  # one untimed call each: the log-mel memo and oneDNN's kernels warm
            member.scores(flow_batch)
        (t_ours, t_theirs), _ = best_times([lambda m=m: m.scores(flow_batch) for m in members], args.repeats)
    result["b4_calls"] = {
        "ours": {
            "ddim_steps": len(members[0].ddim_steps),
            "noise_draws": members[0].noise_draws,
            "ms": 1000 * t_ours,
        },
        "before": {
            "ddim_steps": len(members[1].ddim_steps),
            "noise_draws": members[1].noise_draws,
            "ms": 1000 * t_theirs,
        },
        "speedup": t_theirs / t_ours,
    }

    ours.train()
    theirs.train()
    (t_ours, t_theirs), _ = best_times(
        [lambda: training_pass(ours, batch), lambda: training_pass(theirs, batch)], args.repeats
    )
    result["training"] = {
        "ours_clips_per_s": n / t_ours,
        "before_clips_per_s": n / t_theirs,
        "speedup": t_theirs / t_ours,
    }
    for part in ("fbank", "scoring", "training"):
        r = result[part]
        rates = {k: v for k, v in r.items() if k.endswith("clips_per_s")}
        print(
            f"{part}: "
            + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
            + f", speedup {r['speedup']:.2f}x"
        )
    print(
        f"scoring, ms per {n} clips: "
        + ", ".join(f"{k} {v:.0f}" for k, v in result["scoring_ms_per_part"].items())
    )
    b4 = result["b4_calls"]
    print(
        f"b4: {b4['ours']['ddim_steps']} x {b4['ours']['noise_draws']} calls {b4['ours']['ms']:.0f} ms, "
        f"{b4['before']['ddim_steps']} x {b4['before']['noise_draws']} {b4['before']['ms']:.0f} ms "
        f"({b4['speedup']:.2f}x)"
    )
    for name, r in result["memory_format"].items():
        diff = f", max |diff| {r['max_abs_diff']:.2e}" if "max_abs_diff" in r else ""
        print(
            f"{name}: channels last {r['channels_last_ms']:.0f} ms, NCHW {r['nchw_ms']:.0f} ms "
            f"({r['speedup']:.2f}x){diff}"
        )
    r = result["b6_error_pass"]
    print(
        f"b6 error pass: x_s alone {r['x_s_alone_ms']:.0f} ms, full pass {r['full_pass_ms']:.0f} ms "
        f"({r['speedup']:.2f}x), max |diff| of x_s {r['max_abs_diff_x_s']:.2e}"
    )
    r = result["b2_latent"]
    print(
        f"b2 scoring: kept latent {r['kept_latent_ms']:.0f} ms, own encoder pass {r['own_pass_ms']:.0f} ms "
        f"({r['speedup']:.2f}x), max |diff| {r['max_abs_diff']:.2e}"
    )
    print(f"fbank max |diff| {result['fbank']['max_abs_diff']:.2e}")
    print(
        f"fbank's FFT: scipy {fft['scipy_ms']:.0f} ms, torch {fft['torch_ms']:.0f} ms "
        f"({fft['speedup']:.2f}x), max |diff| {fft['max_abs_diff']:.2e}, "
        f"of the fbank {fft['fbank_max_abs_diff']:.2e}"
    )
    framed = result["fbank"]["framed_first"]
    print(
        f"fbank against the framed-first recipe: {framed['torch_clips_per_s']:.1f} vs "
        f"{framed['framed_first_clips_per_s']:.1f} clips/s ({framed['speedup']:.2f}x), "
        f"max |diff| {framed['max_abs_diff']:.2e}"
    )
    worst = max(result["scoring"]["max_abs_diff"].items(), key=lambda kv: kv[1])
    print(f"scores: largest |diff| {worst[1]:.2e} ({worst[0]})")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
